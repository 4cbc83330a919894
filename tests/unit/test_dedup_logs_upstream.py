"""The idempotency store, the log scrubber, and Clerk's answers mapped to errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import msgspec
import pytest
import structlog
from sign_in_tokens_client.contract.errors import (
    KeyRejectedError,
    RateLimitedError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from sign_in_tokens_client.contract.messages import (
    Created,
    ErrorDetail,
    Failed,
    Reply,
    SignInToken,
    clerk_token_decoder,
)

from service.clerk.upstream import error_for
from service.local.clerk_answers import clerk_errors, make_jwt
from service.logs import REDACTED, Scrubber, configure_logging
from service.state.dedup import Found, IdempotencyKey, Remembered, idempotency_key, pack, unpack
from service.state.dedup.memory import MemoryIdempotencyStore

TOKEN = SignInToken(
    object="sign_in_token", id="sit_1", status="pending", user_id="u", token="t", created_at=1, updated_at=1
)
REQUEST = b'{"user_id":"u"}'


def _created(i: int) -> Created:
    """A reply as the worker makes it: Clerk's JSON decoded, a distinct JWT and URL per token."""
    jwt = make_jwt(f"user_{i}", f"sit_{i:024d}", 600)
    body = {
        "object": "sign_in_token",
        "id": f"sit_{i:024d}",
        "status": "pending",
        "user_id": f"user_{i}",
        "token": jwt,
        "url": f"https://accounts.example.test/v1/tickets/accept?ticket={jwt}",
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_000_000,
    }
    return Created(sign_in_token=clerk_token_decoder.decode(msgspec.json.encode(body)))


def _failed(i: int) -> Failed:
    return Failed(
        error=ErrorDetail(
            code="user_not_found",
            message=f"User nobody{i} not found",
            retryable=False,
            upstream_status=404,
            upstream_code="resource_not_found",
            clerk_trace_id=f"{i:032x}",
            attempts=1,
        ),
    )


def _created_elsewhere(i: int) -> Created:
    """A token whose URL does not hold it, and one with no URL at all."""
    token = _created(i).sign_in_token
    url = None if i % 2 else "https://accounts.example.test/v1/tickets/accept?ticket=elsewhere"
    return Created(sign_in_token=msgspec.structs.replace(token, url=url))


@pytest.mark.parametrize("make", [_created, _failed, _created_elsewhere])
@pytest.mark.parametrize("i", [1, 2])
def test_a_packed_answer_unpacks_to_itself_and_keeps_the_token_once(make: Callable[[int], Reply], i: int) -> None:
    """Packing is lossless; a created token's URL does not store the token a second time."""
    reply = make(i)
    packed = pack(REQUEST, reply)
    assert unpack(packed) == Remembered(REQUEST, reply)
    assert unpack(memoryview(b"A" + packed)[1:]) == Remembered(REQUEST, reply)  # as Redis hands it over
    if isinstance(reply, Created):
        assert packed.count(reply.sign_in_token.token.encode()) == 1


def test_an_answer_packed_by_the_previous_version_still_unpacks() -> None:
    """Replicas of the previous version wrote deflated MessagePack into a shared store."""
    reply = _created(3)
    legacy = zlib.compress(msgspec.msgpack.encode([REQUEST, reply]), 1)
    assert unpack(legacy) == Remembered(REQUEST, reply)


@pytest.mark.parametrize("make", [_created, _failed])
async def test_store_counts_at_least_the_memory_it_holds_and_stays_under_its_bound(
    make: Callable[[int], Reply],
) -> None:
    """Counted bytes cover what tracemalloc sees (within 30 %), and the bound evicts the oldest."""
    entries = 3_000
    requests = [msgspec.json.encode({"user_id": f"user_{i}"}) for i in range(entries)]
    store = MemoryIdempotencyStore(600, 2**40)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(entries):
            # The request body is held by the store alone once the worker has sent it: copy it.
            await remember(store, (f"caller{i % 3}", f"m{i:08d}"), bytes(bytearray(requests[i])), make(i))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= store.size_bytes <= 1.3 * held
    bounded = MemoryIdempotencyStore(600, store.answers_bytes // 2)
    for i in range(entries):
        await remember(bounded, (f"caller{i % 3}", f"m{i:08d}"), requests[i], make(i))
    assert bounded.answers_bytes <= store.answers_bytes // 2
    assert 0 < len(bounded) < entries


async def test_store_remembers_within_the_window_and_scopes_by_publisher() -> None:
    """A remembered reply comes back for its key only; another publisher's key is different."""
    store = MemoryIdempotencyStore(60, 2**20)
    key = idempotency_key("alice", "m1", "replies")
    await remember(store, key, REQUEST, Created(sign_in_token=TOKEN), delivered=True)
    async with store.claim(key) as claim:
        assert (claim.found, claim.remembered) == (Found.ANSWERED, Remembered(REQUEST, Created(sign_in_token=TOKEN)))
    async with store.claim(idempotency_key("bob", "m1", "replies")) as other:
        assert (other.found, other.remembered) == (Found.NEW, None)
    assert idempotency_key("alice", None, "replies") is None
    # Nameless requests share no publisher: their keys are their reply queue's too.
    assert idempotency_key(None, "m1", "billing.replies") != idempotency_key(None, "m1", "outsider.replies")
    assert idempotency_key("alice", "m1", "a") == idempotency_key("alice", "m1", "b")
    # One message_id at two Clerk instances is two requests; the default instance's keys are as before.
    assert idempotency_key("alice", "m1", "a", state="staging") != idempotency_key("alice", "m1", "a")
    assert idempotency_key("alice", "m1", "a", state="default") == ("alice", "m1")


async def test_store_serialises_claims_of_one_key_until_the_reply_is_delivered() -> None:
    """A second claim of a key waits until the first's reply is delivered, then sees its reply."""
    store = MemoryIdempotencyStore(60, 2**20)
    key = idempotency_key(None, "m", "replies")
    seen: list[object] = []

    async def second() -> None:
        async with store.claim(key) as claim:
            seen.append(claim.remembered)

    async with store.claim(key) as claim:
        task = asyncio.create_task(second())
        await claim.remember(REQUEST, Created(sign_in_token=TOKEN), 60)
        await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
        assert not task.done()
        await claim.delivered()
    await task
    assert seen == [Remembered(REQUEST, Created(sign_in_token=TOKEN))]
    assert len(store.locks) == 0


async def test_store_withdraws_an_undelivered_answer_and_keeps_a_delivered_one() -> None:
    """Withdraw frees the key for a fresh call; after delivery it keeps the answer; an unsettled one is taken over."""
    store = MemoryIdempotencyStore(60, 2**20)
    key = idempotency_key("alice", "m1", "replies")
    async with store.claim(key) as claim:
        await claim.remember(REQUEST, Created(sign_in_token=TOKEN), 60)
        assert await claim.withdraw() is True
    async with store.claim(key) as claim:
        assert claim.found is Found.NEW
        await claim.remember(REQUEST, Created(sign_in_token=TOKEN), 60)
    async with store.claim(key) as claim:
        assert claim.found is Found.UNSETTLED
        await claim.delivered()
        assert await claim.withdraw() is False
    async with store.claim(key) as claim:
        assert claim.found is Found.ANSWERED


async def test_a_created_tokens_key_outlives_the_window_as_spent() -> None:
    """After the window, a created token's key is SPENT for the token's lifetime; a failure's is forgotten."""
    store = MemoryIdempotencyStore(0.05, 2**20)
    created, failed = idempotency_key("alice", "c", "replies"), idempotency_key("alice", "f", "replies")
    await remember(store, created, REQUEST, Created(sign_in_token=TOKEN), delivered=True)
    await remember(store, failed, REQUEST, _failed(0), delivered=True)
    await asyncio.sleep(0.1)  # wait-ok: the window's length is what is tested
    async with store.claim(created) as claim:
        assert (claim.found, claim.remembered) == (Found.SPENT, None)
    async with store.claim(failed) as claim:
        assert claim.found is Found.NEW


async def remember(
    store: MemoryIdempotencyStore, key: IdempotencyKey | None, request: bytes, reply: Reply, *, delivered: bool = False
) -> None:
    """Claim ``key``, remember ``reply`` under it (and mark it delivered)."""
    async with store.claim(key) as claim:
        await claim.remember(request, reply, 60)
        if delivered:
            await claim.delivered()


def test_scrubber_redacts_tokens_keys_and_secret_fields() -> None:
    """JWTs, sk_ keys, the configured key and token-named fields never survive a log event."""
    jwt = make_jwt("user_1", "sit_1", 60)
    scrub = Scrubber(["my-literal-key"])
    event = scrub(
        None,
        "info",
        {"event": f"got {jwt}", "error": "sk_live_abc123 rejected", "token": "x", "n": {"a": "my-literal-key"}},
    )
    assert event == {
        "event": f"got {REDACTED}",
        "error": f"{REDACTED} rejected",
        "token": REDACTED,
        "n": {"a": REDACTED},
    }


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging after the test: it binds the (captured) stderr of the moment."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_scrubber_runs_on_configured_structlog_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Through the configured processors, a token passed by mistake is printed redacted."""
    configure_logging("json", "info")
    jwt = make_jwt("user_1", "sit_1", 60)
    structlog.get_logger("t").info("oops", detail=jwt)
    err = capsys.readouterr().err
    assert jwt not in err
    assert REDACTED in err


def test_clerk_answers_map_to_the_contracts_errors() -> None:
    """404, 403/422, 429 (with Retry-After), 5xx and 401 each map to their error."""
    body = msgspec.json.encode(clerk_errors("resource_not_found", "not found"))
    not_found = error_for(404, body, None)
    assert isinstance(not_found, UserNotFoundError)
    assert (not_found.upstream_code, not_found.message) == ("resource_not_found", "not found")
    assert not_found.clerk_trace_id
    assert isinstance(error_for(422, body, None), UpstreamRejectedError)
    limited = error_for(429, b"not json", "3")
    assert isinstance(limited, RateLimitedError)
    assert (limited.retry_after, limited.message) == (3.0, "Clerk answered HTTP 429")
    assert isinstance(error_for(502, b"", None), UpstreamUnavailableError)
    assert isinstance(error_for(401, b"", None), KeyRejectedError)
