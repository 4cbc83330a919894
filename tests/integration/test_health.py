"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from sign_in_tokens_client.client import SignInTokenClient

from service.local.redis_server import LocalRedis
from service.worker import lifecycle as worker_module
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory, wait_until


async def get(worker: Worker, path: str) -> tuple[int, str, str]:
    """Status, content type and text of a GET on the worker's side port."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{worker.health.port}{path}") as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_healthz_and_readyz_are_200_when_consuming(worker: Worker) -> None:
    """A started worker is alive and ready, and says why."""
    assert (await get(worker, "/healthz"))[0] == 200
    status, _, body = await get(worker, "/readyz")
    assert status == 200
    assert '"connected": true' in body
    assert '"consuming": true' in body


async def test_metrics_count_requests_by_lane_and_outcome(worker: Worker, client: SignInTokenClient) -> None:
    """/metrics is Prometheus text with requests by lane and outcome and upstream latency."""
    await client.request("user_m")
    await client.request("nobody")
    status, content_type, text = await get(worker, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'sign_in_tokens_requests_total{instance="default",lane="interactive",outcome="created"} 1.0' in text
    assert 'sign_in_tokens_requests_total{instance="default",lane="interactive",outcome="user_not_found"} 1.0' in text
    assert 'sign_in_tokens_upstream_latency_seconds_count{instance="default",operation="create"} 2.0' in text
    assert "sign_in_tokens_in_flight" in text
    assert "eyJ" not in text


async def test_metrics_have_no_created_timestamps_and_show_the_store_size(
    worker: Worker, client: SignInTokenClient
) -> None:
    """No `_created` series reads like a count; the idempotency store's bytes and entries are reported."""
    await client.request("user_size")
    _, _, text = await get(worker, "/metrics")
    assert "_created" not in text.replace('outcome="created"', "")
    assert "sign_in_tokens_idempotency_store_entries 1.0" in text
    size = next(line for line in text.splitlines() if line.startswith("sign_in_tokens_idempotency_store_bytes "))
    assert float(size.split()[1]) > 1000
    assert "upstream_available" in text
    assert '"broker_unblocked": true' in (await get(worker, "/readyz"))[2]


async def test_every_known_series_starts_at_zero(worker: Worker) -> None:
    """The first dead letter after a start is an increase: its series is there, at 0, before it."""
    _, _, text = await get(worker, "/metrics")
    for lane in ("interactive", "bulk", "revoke"):
        assert f'sign_in_tokens_requests_total{{instance="-",lane="{lane}",outcome="dead_lettered"}} 0.0' in text
        assert f'sign_in_tokens_requests_total{{instance="default",lane="{lane}",outcome="forbidden"}} 0.0' in text
        assert f'sign_in_tokens_in_flight{{lane="{lane}"}} 0.0' in text
        assert f'sign_in_tokens_retries_total{{lane="{lane}"}} 0.0' in text
    assert 'sign_in_tokens_requests_total{instance="default",lane="bulk",outcome="created"} 0.0' in text
    assert 'sign_in_tokens_requests_total{instance="default",lane="revoke",outcome="revoked"} 0.0' in text
    for reason in ("reply_refused_after_unknown_fate", "stopped_before_stored", "revocation_failed"):
        assert f'sign_in_tokens_unsettled_tokens_total{{reason="{reason}"}} 0.0' in text


async def test_a_revocation_is_counted_on_the_revoke_lane(worker: Worker, client: SignInTokenClient) -> None:
    """One label set for revocations: lane="revoke" in the requests counter as in the in-flight gauge."""
    token = await client.create("user_r")
    await client.revoke(token.id)
    _, _, text = await get(worker, "/metrics")
    assert 'sign_in_tokens_requests_total{instance="default",lane="revoke",outcome="revoked"} 1.0' in text
    assert 'sign_in_tokens_requests_total{instance="default",lane="interactive",outcome="created"} 1.0' in text
    assert 'lane="interactive",outcome="revoked"' not in text


async def test_an_idle_worker_notices_redis_is_gone_and_comes_back(
    start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to do, the worker asks Redis now and then: not ready while it is gone, ready when it is back."""
    monkeypatch.setattr(worker_module, "_REDIS_IDLE_CHECK_SECONDS", 1.0)
    async with LocalRedis() as server:
        worker = await start_worker(REDIS_URL=server.url)
        assert (await get(worker, "/readyz"))[0] == 200
        await asyncio.to_thread(server.stop)
        await wait_until(lambda: not worker.readiness()["idempotency_store_available"], what="Redis missed")
        status, _, body = await get(worker, "/readyz")
        assert status == 503
        assert '"idempotency_store_available": false' in body
        _, _, text = await get(worker, "/metrics")
        assert 'sign_in_tokens_check{check="idempotency_store_available"} 0.0' in text
        await server.start()
        await wait_until(lambda: all(worker.readiness().values()), what="ready again")
        assert (await get(worker, "/readyz"))[0] == 200
