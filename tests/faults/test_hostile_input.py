"""Fault 5: a flood of hostile messages; the worker neither crashes nor loses one."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections import Counter
from typing import Any

import aio_pika
import msgspec
import psutil
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from sign_in_tokens_client.contract.messages import Created, decode_reply

from service.local.fake_clerk import FakeClerk
from tests import ledger
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import WorkerProcesses

pytestmark = pytest.mark.slow
CONTENT_TYPES = [None, "", "application/json", "application/msgpack", "text/plain", "application/xml", "a/b; x=1"]
MISSING_QUEUE = "no-such-queue-anywhere"


def _body(rng: random.Random, kind: str) -> bytes:  # noqa: PLR0911 - one branch per kind of hostility
    if kind == "random_bytes":
        return rng.randbytes(rng.randrange(0, 512))
    if kind == "deep_nesting":
        depth = rng.choice([100, 5_000, 40_000])
        return b"[" * depth + b"]" * depth
    if kind == "huge_string":
        return msgspec.json.encode({"user_id": "u" * rng.randrange(300, 60_000)})
    if kind == "wrong_types":
        value = rng.choice([1, True, 1.5, None, [], {}, "x"])
        field = rng.choice(["user_id", "expires_in_seconds", "org_id", "userId", "expiresInSeconds"])
        return msgspec.json.encode({"user_id": "user_x", field: value})
    if kind == "invalid_utf8":
        return b'{"user_id": "user_\xff\xfe\xc3"}'
    if kind == "unknown_fields":
        return msgspec.json.encode({"user_id": "user_x", "expires_in_second": 60, "admin": True})
    if kind == "msgpack_as_json":
        return msgspec.msgpack.encode({"user_id": "user_x"})
    return msgspec.json.encode({"user_id": f"user_valid{rng.randrange(10**9)}"})


def _headers(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice(
        [
            None,
            {"x-deadline": "tomorrow"},
            {"x-deadline": 1.5},
            {"x-deadline": -1},
            {"x-deadline": {"nested": [1, 2]}},
            {"x-deadline": True},
            {"x-unknown": "\x00\x01", "x-deadline": 2**62},
        ],
    )


KINDS = ["random_bytes", "deep_nesting", "huge_string", "wrong_types", "invalid_utf8", "unknown_fields",
         "msgpack_as_json", "valid"]  # fmt: skip


class _Microseconds(dt.datetime):
    """A timestamp written as microseconds since the epoch."""

    def timestamp(self) -> float:
        return 1_700_000_000_000_000.0


def _odd_properties(rng: random.Random, index: int, message: aio_pika.Message) -> str:
    """Properties RabbitMQ passes through and strict decoders refuse (not UTF-8, a timestamp in microseconds)."""
    odd = rng.choice(["correlation_id", "header_name", "timestamp"])
    if odd == "correlation_id":
        message.correlation_id = f"h{index}-\udcff\udcfe"
    elif odd == "header_name":
        message.headers = {**(message.headers or {}), "x-\udcff": "v"}
    else:
        message.timestamp = _Microseconds(2026, 1, 1)
    return f"odd_{odd}"


def hostile(rng: random.Random, index: int, reply_to: str) -> tuple[str, aio_pika.Message]:
    """One hostile message with a unique id: body, content type, headers, properties and reply_to at random."""
    kind = rng.choice(KINDS)
    destination = rng.choices([reply_to, None, MISSING_QUEUE], weights=[8, 1, 1])[0]
    message = aio_pika.Message(
        _body(rng, kind),
        content_type=rng.choice(CONTENT_TYPES),
        headers=_headers(rng),
        message_id=f"h{index}",
        correlation_id=rng.choice([f"h{index}", None]),
        reply_to=destination,
    )
    if rng.random() < 0.1:
        kind = _odd_properties(rng, index, message)
    return kind, message


async def count_by_id(channel: AbstractChannel, queue: str, seen: Counter[str]) -> None:
    """Count every message of ``queue`` by correlation id (or message id)."""
    declared = await channel.declare_queue(queue, passive=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        seen[message.correlation_id or message.message_id or "?"] += 1
        if (message.headers or {}).get("x-outcome") == "created":
            reply = decode_reply(message.body, message.content_type)
            assert isinstance(reply, Created)
            book = ledger.current()
            if book is not None:
                book.delivered(reply.sign_in_token.id, queue, message.correlation_id)

    await declared.consume(on_message, no_ack=True)


async def test_hostile_messages_are_all_answered_or_dead_lettered(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Random bytes, deep nesting, huge strings, wrong types, bad UTF-8, 10 MB bodies, bad headers and properties.

    None is lost, none answered twice, and the worker's connection never drops.
    """
    count = figures.scale(20_000, 100_000)
    rng = random.Random(20261123)
    worker = await worker_processes.start()
    reply_queue = await channel.declare_queue(f"{queue_names['REQUEST_QUEUE']}.replies", durable=True)
    seen: Counter[str] = Counter()
    for queue in (reply_queue.name, queue_names["RESULTS_QUEUE"], queue_names["DEAD_LETTER_QUEUE"]):
        await count_by_id(channel, queue, seen)
    kinds: Counter[str] = Counter()
    for start in range(0, count, 250):
        batch = [hostile(rng, i, reply_queue.name) for i in range(start, min(start + 250, count))]
        kinds.update(kind for kind, _ in batch)
        await asyncio.gather(
            *(channel.default_exchange.publish(m, queue_names["REQUEST_QUEUE"], mandatory=False) for _, m in batch),
        )
    huge = figures.scale(3, 10)
    for i in range(huge):
        big = aio_pika.Message(b"{" + b" " * 10_000_000 + b"}", message_id=f"big{i}", reply_to=reply_queue.name)
        await channel.default_exchange.publish(big, queue_names["REQUEST_QUEUE"])
    sent = count + huge
    await wait_until(lambda: len(seen) == sent, timeout=300, what="every message accounted for")
    events = worker_processes.events()
    rss_mib = psutil.Process(worker.pid).memory_info().rss / 2**20
    figures.record(
        "hostile input",
        sent=sent,
        accounted=len(seen),
        lost=sent - len(seen),
        delivered_twice=sum(n - 1 for n in seen.values()),
        worker_crashes=int(not worker.alive()),
        unexpected_errors=sum(1 for e in events if e["event"] == "unexpected_error"),
        connection_losses=sum(1 for e in events if e["event"] == "broker_connection_lost"),
        tokens_created=fake_clerk.stats.created,
        tokens_revoked=len(fake_clerk.stats.revoked),
        worker_rss_after_mib=round(rss_mib),
        kinds=dict(kinds),
    )
    assert worker.alive()
    assert len(seen) == sent
    assert set(seen.values()) == {1}
    assert not [e for e in events if e["event"] == "unexpected_error"]
    assert not [e for e in events if e["event"] == "broker_connection_lost"]
    assert fake_clerk.stats.revoked == {t for t, o in fake_clerk.stats.tokens.items() if o["status"] == "revoked"}
    await token_ledger.balanced()
