"""One trace from the client through the queue to the Clerk call and back, in the in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sign_in_tokens_client.client import SignInTokenClient

from service import tracing
from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, wait_until


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in finished}


async def test_one_trace_covers_client_worker_clerk_and_reply(
    spans: InMemorySpanExporter,
    start_worker: WorkerFactory,
    amqp_url: str,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    await start_worker()
    async with SignInTokenClient(amqp_url, request_queue=queue_names["REQUEST_QUEUE"]) as client:
        token = await client.create("user_traced", expires_in_seconds=60)
        await wait_until(lambda: "sign_in_tokens process" in by_name(spans.get_finished_spans()), what="spans")
    found = by_name(spans.get_finished_spans())
    expected = {
        "sign_in_tokens create", "sign_in_tokens process", "decode", "policy", "rate slot",
        "clerk create", "audit event", "reply publish",
    }  # fmt: skip
    assert expected <= set(found)
    root = found["sign_in_tokens create"]
    assert root.parent is None
    trace_id = root.context.trace_id
    assert {found[name].context.trace_id for name in expected} == {trace_id}
    process = found["sign_in_tokens process"]
    assert process.parent is not None
    assert process.parent.span_id == root.context.span_id  # continued from the request's traceparent
    for step in expected - {"sign_in_tokens create", "sign_in_tokens process"}:
        parent = found[step].parent
        assert parent is not None
        assert parent.span_id == process.context.span_id, step
    assert process.attributes is not None
    assert (process.attributes["sign_in_tokens.lane"], process.attributes["sign_in_tokens.outcome"]) == (
        "interactive",
        "created",
    )
    assert process.attributes["sign_in_tokens.attempts"] == 1
    assert found["clerk create"].attributes["http.response.status_code"] == 200  # type: ignore[index]
    # Nothing any span carries is the token or its URL.
    for span in found.values():
        for value in (span.attributes or {}).values():
            assert token.token not in str(value)
            assert str(token.url) not in str(value)
