"""The link to Redis: commands asked for together share pipelines, and each gets its own answer."""

from __future__ import annotations

import asyncio
from typing import Any

from service.local_broker import free_port
from service.redis_link import REDIS_FAILURES, RedisLink

_ECHO = "return ARGV[1]"


async def test_concurrent_commands_share_pipelines_and_each_gets_its_own_answer(redis_url: str) -> None:
    """300 requests' commands at once: every answer is the caller's own, in far fewer round trips."""
    link = RedisLink(redis_url, "test")
    pipelines = 0
    make_pipeline = link.client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return make_pipeline(*args, **kwargs)

    link.client.pipeline = counted  # type: ignore[method-assign]
    echo = link.client.register_script(_ECHO)

    async def one(i: int) -> tuple[object, object]:
        await link.command("SET", f"k{i}", f"v{i}")
        return await link.command("GET", f"k{i}"), await link.script(echo, [f"k{i}"], [f"e{i}"])

    try:
        answers = await asyncio.gather(*(one(i) for i in range(300)))
    finally:
        await link.close()
    assert answers == [(f"v{i}".encode(), f"e{i}".encode()) for i in range(300)]
    assert pipelines <= 300 * 3 // 10, f"{pipelines} pipelines for 900 commands"


async def test_one_command_alone_goes_at_once(redis_url: str) -> None:
    """Nothing else asked for: the command is its own pipeline, sent in the same pass."""
    link = RedisLink(redis_url, "test")
    try:
        assert await asyncio.wait_for(link.command("PING"), timeout=1) is True
    finally:
        await link.close()


async def test_a_script_redis_forgot_is_loaded_again(redis_url: str) -> None:
    """After a Redis restart (SCRIPT FLUSH here) the script reloads itself; nothing fails."""
    link = RedisLink(redis_url, "test")
    echo = link.client.register_script(_ECHO)
    try:
        assert await link.script(echo, ["k"], ["first"]) == b"first"
        await link.client.script_flush()
        answers = await asyncio.gather(*(link.script(echo, ["k"], [f"again{i}"]) for i in range(5)))
    finally:
        await link.close()
    assert answers == [f"again{i}".encode() for i in range(5)]


async def test_a_command_to_an_unreachable_redis_raises_for_each_caller() -> None:
    """No Redis: every caller of the pipeline gets the connection error, none hangs."""
    link = RedisLink(f"redis://127.0.0.1:{free_port()}/0", "test")
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(link.command("PING") for _ in range(10)), return_exceptions=True), timeout=10
        )
    finally:
        await link.close()
    assert all(isinstance(result, REDIS_FAILURES) for result in results), results
