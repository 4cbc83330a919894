"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import aiohttp

from service.client import SignInTokenClient
from service.worker import Worker


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
    assert 'sign_in_tokens_requests_total{lane="interactive",outcome="created"} 1.0' in text
    assert 'sign_in_tokens_requests_total{lane="interactive",outcome="user_not_found"} 1.0' in text
    assert 'sign_in_tokens_upstream_latency_seconds_count{operation="create"} 2.0' in text
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
