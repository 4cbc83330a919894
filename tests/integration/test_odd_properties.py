"""Properties RabbitMQ accepts but strict decoders refuse: the connection survives, every request is answered."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.wire import PAMQP_VERSION, installed_version

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import wait_until
from tests.workers import Replies


class _Microseconds(dt.datetime):
    """A timestamp that pamqp writes as microseconds since the epoch (what some clients send)."""

    def timestamp(self) -> float:
        return 1_700_000_000_000_000.0


ODD = {
    "correlation_id": spec.Basic.Properties(correlation_id="odd-\udcff\udcfe", message_id="odd-1"),
    "header_name": spec.Basic.Properties(correlation_id="odd-2", headers={"x-\udcff": "v"}),
    "timestamp": spec.Basic.Properties(correlation_id="odd-3", timestamp=_Microseconds(2026, 1, 1)),
}


def test_the_pamqp_patch_is_for_the_installed_version() -> None:
    """The local change to pamqp's codecs was written for one version; another must be reviewed first."""
    assert installed_version() == PAMQP_VERSION


@pytest.mark.parametrize("odd", list(ODD))
async def test_a_message_with_odd_properties_is_answered_and_breaks_nothing(
    odd: str,
    worker: Worker,
    channel: AbstractChannel,
    client: SignInTokenClient,
    replies: Replies,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """Non-UTF-8 correlation_id or header name, a timestamp in microseconds: answered, and 20 requests after it too."""
    properties = ODD[odd]
    properties.reply_to = replies.queue
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(
        b'{"user_id": "user_odd"}', routing_key=queue_names["REQUEST_QUEUE"], properties=properties
    )
    futures = [await client.send(b'{"user_id": "user_after%d"}' % i) for i in range(20)]
    answers = [(await f).decode() for f in futures]
    assert [type(a).__name__ for a in answers] == ["Created"] * 20
    await wait_until(lambda: replies.per_request[properties.correlation_id] == 1, what="the odd message's reply")
    assert replies.outcomes["created"] == 1
    assert worker.readiness()["connected"]
    assert fake_clerk.stats.created == 21


async def test_the_reply_echoes_a_correlation_id_that_is_not_utf8_byte_for_byte(
    worker: Worker, channel: AbstractChannel, queue_names: dict[str, str]
) -> None:
    """The caller matches its reply by the octets it sent."""
    reply_queue = await channel.declare_queue(exclusive=True)
    underlay = await channel.get_underlay_channel()
    properties = spec.Basic.Properties(correlation_id="c-\udcff", reply_to=reply_queue.name)
    await underlay.basic_publish(
        b'{"user_id": "user_c"}', routing_key=queue_names["REQUEST_QUEUE"], properties=properties
    )
    async with reply_queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            break
    assert message.correlation_id == "c-\udcff"
    assert message.correlation_id.encode("utf-8", "surrogateescape") == b"c-\xff"
    assert msgspec.json.decode(message.body)["outcome"] == "created"
