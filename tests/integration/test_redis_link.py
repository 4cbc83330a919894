"""The link to Redis: commands asked for together share pipelines, and each gets its own answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio

from service.local.rabbitmq import free_port
from service.state.redis_link import REDIS_FAILURES, REDIS_TIMEOUT_SECONDS, RedisLink
from tests.faults.proxy import FaultyProxy

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


async def test_a_command_that_timed_out_runs_once_and_its_late_reply_is_never_another_commands(redis_url: str) -> None:
    """Redis stalls past the timeout: the command fails once (no retry of its own), and runs once when Redis wakes.

    redis-py retries a timed-out command by itself (ten times in 8.x), and each retry would run
    after the first; a reply left on a reused connection would answer the next command.
    """
    target = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = FaultyProxy(target)
    await proxy.start()
    link = RedisLink(f"redis://127.0.0.1:{proxy.port}/0", "test")
    direct = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await link.command("SET", "counted", 0) is True
        proxy.hold()
        started = time.monotonic()
        with pytest.raises(REDIS_FAILURES):
            await link.command("INCR", "counted")
        failed_after = time.monotonic() - started
        proxy.unstall()
        assert await link.command("SET", "other", "mine") is True
        assert await link.command("GET", "other") == b"mine"
        counted: list[bytes | None] = []

        async def read() -> None:
            counted.append(await direct.get("counted"))

        for _ in range(100):  # the held INCR reaches Redis when the proxy lets its bytes go
            await read()
            if counted[-1] != b"0":
                break
            await asyncio.sleep(0.02)  # wait-ok: the poll interval of a condition wait
        await link.command("PING")
        await read()
    finally:
        await link.close()
        await direct.aclose()
        await proxy.stop()
    assert failed_after < REDIS_TIMEOUT_SECONDS + 1
    assert counted[-1] == b"1", counted
