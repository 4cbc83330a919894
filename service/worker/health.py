"""The side HTTP server: /healthz, /readyz, /metrics; and the metrics themselves.

Metric labels are lanes, outcomes, operations and the configured Clerk
instances' names only: never a user, a message id, a token or a key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Final, Literal, TypeVar, get_args

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from sign_in_tokens_client.contract.errors import BY_CODE, ConfigError
from sign_in_tokens_client.contract.lanes import IMPERSONATE, REVOKE, Lane

from service.clerk.upstreams import HoldReason

# A `_created` series holds a Unix timestamp under a counter's name (requests_created
# reads like a token count); nothing here needs it.
disable_created_metrics()  # type: ignore[no-untyped-call]

M = TypeVar("M", bound=MetricWrapperBase)
# Why a token may be live with nobody known to hold it (sign_in_tokens_unsettled_tokens_total).
UnsettledReason = Literal[
    "reply_refused_after_unknown_fate",
    "fate_unknown_at_stop",
    "stopped_before_stored",
    "revocation_failed",
    "answer_unreadable",
]
# The ``instance`` of a request refused before its Clerk instance was chosen (no instance's name can be it).
NO_INSTANCE: Final = "-"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        """Create every metric once."""
        self.registry = CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        r = self.registry
        self.requests = Counter(
            "sign_in_tokens_requests",
            "Requests answered or dead-lettered, by lane (interactive, bulk, impersonate, revoke), outcome (created, "
            "revoked, an error code, dead_lettered) and Clerk instance (- when refused before one was chosen).",
            ["lane", "outcome", "instance"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "sign_in_tokens_upstream_latency_seconds",
            "Latency of calls to Clerk, by operation and Clerk instance.",
            ["operation", "instance"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("sign_in_tokens_retries", "Upstream retries after a failure.", ["lane"], registry=r)
        self.in_flight = Gauge("sign_in_tokens_in_flight", "Requests being processed, by lane.", ["lane"], registry=r)
        self.dedup_hits = Counter("sign_in_tokens_dedup_hits", "Answers from the idempotency store.", registry=r)
        self.revoked = Counter(
            "sign_in_tokens_revoked",
            "Tokens revoked: by the service (nobody could receive them, or too late) or at their caller's request.",
            registry=r,
        )
        self.ambiguous_creates = Counter(
            "sign_in_tokens_ambiguous_creates",
            "Creates cut after they were sent (a timeout after the request left, or a stop): Clerk may have "
            "made a token that nobody holds (it has no idempotency key and no list endpoint to find it).",
            registry=r,
        )
        self.unsettled = Counter(
            "sign_in_tokens_unsettled_tokens",
            "Tokens left live whose holder cannot be known: reply_refused_after_unknown_fate (a copy's reply "
            "was refused after an earlier reply's confirm was lost), fate_unknown_at_stop (the in-process store "
            "stopped with a published reply unconfirmed), stopped_before_stored (the grace period ended while "
            "Redis was away), revocation_failed (the broker would not take the order, and Clerk the revocation).",
            ["reason"],
            registry=r,
        )
        self.audit_unconfirmed = Counter(
            "sign_in_tokens_audit_unconfirmed",
            "Attempts to publish an audit event the broker did not confirm (each is tried again; the request "
            "waits unacknowledged).",
            registry=r,
        )
        self.key_rejected = Counter(
            "sign_in_tokens_key_rejected", "Answers 401 from Clerk, by Clerk instance.", ["instance"], registry=r
        )
        self.held = Counter(
            "sign_in_tokens_held",
            "Requests moved to a Clerk instance's hold queue, by instance and reason (key_rejected, "
            "upstream_unavailable, busy: a bulk request while its instance's rate limit is full).",
            ["instance", "reason"],
            registry=r,
        )
        self.instance_check = Gauge(
            "sign_in_tokens_instance_check",
            "Each Clerk instance's checks (key_ok, upstream_available): 1 passing, 0 failing.",
            ["instance", "check"],
            registry=r,
        )
        self.ready = Gauge(
            "sign_in_tokens_ready",
            "1 when /readyz passes all of: connected, broker_unblocked, consuming, key_ok, upstream_available, "
            "rate_limit_available.",
            registry=r,
        )
        self.check = Gauge(
            "sign_in_tokens_check",
            "Each /readyz check (connected, key_ok, upstream_available, ...): 1 passing, 0 failing.",
            ["check"],
            registry=r,
        )
        self.rate_limit_waiting = Gauge(
            "sign_in_tokens_rate_limit_waiting",
            "Requests waiting for a slot under Clerk's rate limit, by lane and Clerk instance (above 0 for long: held "
            "at the limit).",
            ["lane", "instance"],
            registry=r,
        )
        self.idempotency_bytes = Gauge(
            "sign_in_tokens_idempotency_store_bytes",
            "Memory counted for the idempotency store (bounded by IDEMPOTENCY_MAX_BYTES).",
            registry=r,
        )
        self.idempotency_entries = Gauge(
            "sign_in_tokens_idempotency_store_entries", "Answers held in the idempotency store.", registry=r
        )

        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Every series of a known label set, from the start: the first request of a kind is an increase.

        (A series that appears at 1 has no increase over a range that begins before it: the first
        dead letter after a start would never fire ``SignInTokensDeadLettersGrowing``.)
        """
        for lane in (*(lane.value for lane in Lane), IMPERSONATE, REVOKE):
            self.labelled(self.in_flight, lane)
            self.labelled(self.retries, lane)
        self._requests_at_zero(NO_INSTANCE)
        for reason in get_args(UnsettledReason):
            self.labelled(self.unsettled, reason)

    def _requests_at_zero(self, instance: str) -> None:
        failures = (*BY_CODE, "dead_lettered")
        for lane in (*(lane.value for lane in Lane), IMPERSONATE):
            for outcome in ("created", *failures):
                self.labelled(self.requests, lane, outcome, instance)
        for outcome in ("revoked", *failures):
            self.labelled(self.requests, REVOKE, outcome, instance)

    def instances(self, names: Iterable[str]) -> None:
        """Every series of each Clerk instance, from the start (as ``_start_at_zero``)."""
        for name in names:
            self._requests_at_zero(name)
            self.labelled(self.key_rejected, name)
            for reason in get_args(HoldReason):
                self.labelled(self.held, name, reason)
            for operation in ("create", "revoke", "probe"):
                self.labelled(self.upstream_latency, operation, name)

    def forget_instance(self, name: str) -> None:
        """An instance a SIGHUP removed: its checks are no longer exported (an alert on them would never clear)."""
        for metric, values in list(self._children):
            if metric is self.instance_check and values[0] == name:
                del self._children[metric, values]
                self.instance_check.remove(*values)

    def count(self, lane: str, outcome: str, instance: str | None) -> None:
        """One more request answered (or dead-lettered) from ``lane`` with ``outcome``, at ``instance``."""
        self.labelled(self.requests, lane, outcome, instance or NO_INSTANCE).inc()

    def count_unsettled(self, reason: UnsettledReason) -> None:
        """One more token whose holder cannot be known, for ``reason``."""
        self.labelled(self.unsettled, reason).inc()

    def labelled(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, looked up once: every message counts, and ``labels`` locks and checks."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class HealthServer:
    """aiohttp.web on HTTP_PORT; ``is_ready`` is asked at each /readyz."""

    def __init__(
        self,
        metrics: Metrics,
        is_ready: Callable[[], dict[str, bool]],
        host: str,
        port: int,
        instances: Callable[[], dict[str, dict[str, bool]]] = dict,
    ) -> None:
        """Prepare the routes; ``start`` binds the port. ``instances``: each Clerk instance's checks."""
        self._metrics = metrics
        self._is_ready = is_ready
        self._instances = instances
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    def _checks(self) -> tuple[bool, dict[str, bool], dict[str, dict[str, bool]]]:
        checks = self._is_ready()
        ready = all(checks.values())
        metrics = self._metrics
        metrics.ready.set(1 if ready else 0)
        for name, passing in checks.items():
            metrics.labelled(metrics.check, name).set(1 if passing else 0)
        instances = self._instances()
        for instance, its in instances.items():
            for name, passing in its.items():
                metrics.labelled(metrics.instance_check, instance, name).set(1 if passing else 0)
        return ready, checks, instances

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, checks, instances = self._checks()
        return web.json_response({"ready": ready, **checks, "instances": instances}, status=200 if ready else 503)

    async def _metrics_page(self, _: web.Request) -> web.Response:
        self._checks()
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        """Bind and serve."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            msg = f"HTTP_PORT: cannot listen on {self._host}:{self._port} ({reason})"
            raise ConfigError(msg) from None
        server = site._server  # noqa: SLF001 - the only way to learn a port chosen by the OS
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
