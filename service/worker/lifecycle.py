"""The worker's lifecycle: start, stop, pause and resume, Redis watching, readiness.

One message's path through the worker is ``pipeline.py``'s; this module builds what it needs and
runs it for each delivery. With one Clerk key, a rejected key pauses the worker around a probe
(``key_probe.py``); with CLERK_INSTANCES_FILE, a held instance's requests wait in its hold queue
(``holds.py``) while the others are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.connection import CHANNEL_FAILURES, DEFAULT_INSTANCE
from sign_in_tokens_client.contract.errors import ConfigError, KeyRejectedError, ShutdownRequestedError
from sign_in_tokens_client.contract.lanes import Source, source_label

from service.amqp import broker, consumers, publisher, topology
from service.clerk.instances import load_instances
from service.clerk.retry import RetryPolicy
from service.clerk.upstream import InstanceKeyRejectedError
from service.clerk.upstreams import InstanceHeldError
from service.config import SHUTDOWN_MARGIN_SECONDS, Settings
from service.state.dedup import IdempotencyStore, open_store
from service.state.dedup.memory import MemoryIdempotencyStore
from service.state.grants import Grants
from service.trust.audit import AuditTrail
from service.trust.policy import Policy, policy_from_settings
from service.trust.sealing import sealing_keys
from service.worker.clerk_instances import ClerkInstances
from service.worker.health import HealthServer, Metrics
from service.worker.holds import InstanceHolds
from service.worker.key_probe import KeyProbe
from service.worker.parts import Parts
from service.worker.pipeline import Pipeline
from service.worker.policy_notes import log_policy, log_sealing, reload_sealing_key

if TYPE_CHECKING:
    from service.state.redis_link import RedisLink

log = structlog.get_logger(__name__)

# While Redis is away, how often the worker asks it again.
_REDIS_WATCH_SECONDS: Final = 0.5
# How long a link to Redis may stay quiet before the worker asks Redis whether it is there.
_REDIS_IDLE_CHECK_SECONDS: Final = 5.0


class Worker:
    """Consumes both lanes, answers each request exactly once while it stays up."""

    def __init__(self, settings: Settings, *, name: str = "sign-in-token-worker") -> None:
        """Build every part; nothing connects until ``start``."""
        self.settings = settings
        self.name = name
        instances = load_instances(settings, settings.clerk_instances_file)  # first: bad files stop a start
        policy = policy_from_settings(settings)
        sealing = self.sealing = sealing_keys(settings)
        self.metrics = Metrics()
        self.dedup: IdempotencyStore = open_store(settings, lambda: sealing.answers)
        store = self.dedup
        if isinstance(store, MemoryIdempotencyStore):  # Redis's memory is Redis's to report
            self.metrics.idempotency_bytes.set_function(lambda: store.size_bytes)
            self.metrics.idempotency_entries.set_function(lambda: len(store))
        self.stopping = asyncio.Event()
        self.instances = ClerkInstances(settings, self.metrics, self.stopping, self._instance_down, self._instance_up)
        self.health = HealthServer(
            self.metrics, self.readiness, settings.http_host, settings.http_port, self.instances.readiness
        )
        # With CLERK_INSTANCES_FILE a held instance's requests move to its hold queue; else the worker pauses.
        self.holding = settings.clerk_instances_file is not None
        default = instances.get(DEFAULT_INSTANCE)
        self.parts = Parts(
            settings=settings,
            metrics=self.metrics,
            upstreams=self.instances.build(instances),
            retry=RetryPolicy(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_delay_seconds),
            dedup=self.dedup,
            # Earlier versions kept the grants under the digest of the one key: read while they may live.
            grants=Grants(self.dedup.redis, default.key_id() if default is not None and not self.holding else None),
            policy=policy,
            stopping=self.stopping,
            holding=self.holding,
            sealing=sealing,
        )
        self.parts.serve(self.parts.upstreams)  # their state ids known from the start
        self.pipeline = Pipeline(self.parts)
        self.holds = InstanceHolds(self.parts, self.pipeline.settle, self._on_request)
        self.instances.attach(self.parts, self.holds)
        self.key_probe = KeyProbe(self.parts, self.pipeline, self._pause, self._resume)
        self._paused: set[str] = set()
        self._lost_at: float | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consumers: consumers.Consumers[Source] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis_watch: asyncio.Task[None] | None = None

    @property
    def _publisher(self) -> publisher.ReplyPublisher | None:
        """Where replies go out, once started (tests look at its channel)."""
        return self.parts.publisher_or_none

    @property
    def policy(self) -> Policy:
        """The rules in force (``reload_policy`` replaces them; a request keeps those it started with)."""
        return self.parts.policy

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, open channels and start consuming."""
        await self.health.start()
        for upstream in self.parts.upstreams.values():
            await upstream.clerk.start()
        limiters = [upstream.clerk.limiter.redis for upstream in self.parts.upstreams.values()]
        links = [link for link in (*limiters, self.dedup.redis) if link is not None]
        for link in links:  # first: a certificate that does not verify stops the start (ConfigError)
            await link.check(at_start=True)
        self._connection = await broker.connect(self.settings, self.name)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        await topology.declare_topology(self._connection, self.settings)
        replies = publisher.ReplyPublisher(
            self._connection,
            self.settings.dead_letter_queue,
            self.settings.confirm_timeout_seconds,
            self.settings.broker_user,
        )
        await replies.open()
        self.parts.publisher_or_none = replies
        self.parts.audit_or_none = AuditTrail(self._connection, replies, self.settings)
        self._consumers = consumers.Consumers(
            self._connection, self.settings.prefetch, topology.lane_queue_names(self.settings), self._on_message
        )
        await self._consumers.open()
        if self.holding:
            await self.holds.open(self._connection)
        if links:
            self._redis_watch = asyncio.create_task(self._watch_redis(links))
            if not all(link.available for link in links):
                await self._pause("redis_unavailable")
        if not self._paused:
            await self._consumers.resume()
            await self.holds.resume()
        log.info(
            "worker_started",
            http_port=self.health.port,
            prefetch=self.settings.prefetch,
            upstream_concurrency=self.settings.concurrency,
            clerk_instances=sorted(self.parts.upstreams),
        )
        self._log_policy("policy_in_force")
        log_sealing(self.sealing, self.dedup.redis is not None)
        for name, upstream in self.parts.upstreams.items():
            limiter = upstream.clerk.limiter
            if limiter.shared:
                log.info("rate_limit_shared", instance=name, calls=limiter.limit, window_seconds=limiter.window_seconds)
            else:
                log.warning(
                    "rate_limit_in_process",
                    instance=name,
                    calls=limiter.limit,
                    window_seconds=limiter.window_seconds,
                    assumes="this worker is the only one calling Clerk with this key; set REDIS_URL to share it",
                )

    async def _instance_down(self, _: str) -> None:
        """An instance's breaker opened."""
        if self.holding:
            await self.holds.follow()
        else:
            await self._pause("upstream_unavailable")

    async def _instance_up(self, _: str) -> None:
        """An instance's breaker closed."""
        if self.holding:
            await self.holds.follow()
        else:
            await self._resume("upstream_unavailable")

    def _log_policy(self, event: str) -> None:
        log_policy(self.policy, self.settings.policy_file, self.parts.instances, event)

    def reload_policy(self) -> bool:
        """Read POLICY_FILE again (SIGHUP); a bad file keeps the policy in force and says why.

        Requests already past the policy keep the decision they had; the next ones get the new rules.
        """
        if not self.settings.policy_file:
            log.warning("policy_not_reloaded", reason="POLICY_FILE is not set")
            return False
        try:
            self.parts.policy = policy_from_settings(self.settings)
        except ConfigError as exc:
            log.error("policy_reload_failed", reason=str(exc), action="keeping the policy in force")  # noqa: TRY400
            return False
        self._log_policy("policy_reloaded")
        return True

    async def reload_instances(self) -> bool:
        """Read CLERK_INSTANCES_FILE and every key file again (what SIGHUP does after the policy)."""
        return await self.instances.reload()

    def reload(self) -> None:
        """SIGHUP: read REPLY_SEALING_KEY_FILE, POLICY_FILE, and the Clerk instances and their key files, again."""
        reload_sealing_key(self.sealing)
        self.reload_policy()

        async def instances() -> None:
            await self.instances.reload()

        task = asyncio.create_task(instances())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        # Called again at each failed reconnect attempt: one line for the loss, one for the return.
        if self._lost_at is None and not self.stopping.is_set():
            self._lost_at = time.monotonic()
            log.warning("broker_connection_lost", reason=type(exc).__name__ if exc else None)

    def _on_reconnected(self, _: object) -> None:
        down = None if self._lost_at is None else round(time.monotonic() - self._lost_at, 1)
        self._lost_at = None
        log.info("broker_reconnected", down_seconds=down)

    @property
    def key_ok(self) -> bool:
        """Whether Clerk's last word on every instance's key accepted it (true until it has said anything)."""
        return all(upstream.key_ok for upstream in self.parts.upstreams.values())

    def readiness(self) -> dict[str, bool]:
        """The checks behind /readyz: ready while at least one Clerk instance works.

        ``key_ok`` and ``upstream_available`` say whether an instance that works has them; each
        instance's own are in ``instance_readiness``.
        """
        connection = self._connection
        upstreams = self.parts.upstreams.values()
        return {
            "connected": connection is not None and connection.connected.is_set(),
            "broker_unblocked": connection is None or not broker.is_blocked(connection),
            "consuming": self._consumers is not None and self._consumers.consuming,
            "key_ok": any(upstream.key_ok for upstream in upstreams),
            "upstream_available": any(not upstream.breaker.is_open for upstream in upstreams),
            "clerk_instance_working": any(not upstream.held for upstream in upstreams),
            "rate_limit_available": all(upstream.clerk.limiter.available for upstream in upstreams),
            "idempotency_store_available": self.dedup.available,
            "audit_routed": self.parts.audit_or_none is None or self.parts.audit_or_none.routed,
        }

    async def shutdown(self) -> None:
        """Stop taking requests, finish or return those in flight, close everything.

        No call to Clerk starts any more: a request that has not sent its create goes back to its
        queue at once; one whose create was sent waits for Clerk's answer and delivers it (the
        grace period covers a call: config checks it).
        """
        self.stopping.set()
        self.instances.stop_sending()
        if self._consumers is not None:
            await self._consumers.pause()
        await self.holds.pause()
        pending = {
            t
            for t in (*self._tasks, self.key_probe.task, *self.holds.tasks, *self.instances.tasks)
            if t is not None and not t.done()
        }
        if pending:
            grace = max(0.0, self.settings.shutdown_grace_seconds - SHUTDOWN_MARGIN_SECONDS)
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.pipeline.revocations.settle_in_process_answers(self.dedup)
        await self.instances.stop_probing()
        await self.holds.close()
        if self._redis_watch is not None:
            self._redis_watch.cancel()
            await asyncio.gather(self._redis_watch, return_exceptions=True)
        if self._connection is not None:
            # Whatever is still unacknowledged returns to its queue.
            with contextlib.suppress(*CHANNEL_FAILURES):
                await self._connection.close()
        await self.instances.close()
        await self.dedup.close()
        await self.health.stop()
        if self._connection is not None:
            log.info("worker_stopped")

    # -- each delivery -------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage, source: Source) -> None:
        await self._on_request(message, source, False)  # noqa: FBT003 - not from a hold queue

    async def _on_request(self, message: DeliveredMessage, source: Source, held: bool) -> None:  # noqa: FBT001
        """Handle one request taken from ``source``'s queue (``held``: from a hold queue, on its behalf)."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        in_flight = self.metrics.labelled(self.metrics.in_flight, source_label(source))
        in_flight.inc()
        try:
            await self.pipeline.handle(message, source, held=held)
        except InstanceHeldError as exc:
            await self.holds.move(message, source, exc.instance, exc.reason, held=held)
        except KeyRejectedError as exc:
            if self.holding and isinstance(exc, InstanceKeyRejectedError):
                self.metrics.labelled(self.metrics.key_rejected, exc.instance).inc()
                await self.holds.move(message, source, exc.instance, "key_rejected", held=held)
            else:
                await self.key_probe.hold(message, source)
        except ShutdownRequestedError:
            await self.pipeline.settle.give_back(message, "shutting_down")
        except Exception as exc:  # noqa: BLE001 - a defect must not leave the request stuck
            await self.pipeline.settle.after_defect(message, exc)
        finally:
            in_flight.dec()
            if task is not None:
                self._tasks.discard(task)

    # -- pauses --------------------------------------------------------------

    async def _watch_redis(self, links: list[RedisLink]) -> None:
        """Pause consumption while any link to Redis fails; ask the failed ones until they answer.

        A link with nothing to send is asked too (PING) once it has been quiet for
        ``_REDIS_IDLE_CHECK_SECONDS``: an idle worker notices Redis is gone (not ready, and the
        alert on ``idempotency_store_available``) before a request finds out.
        """
        while not self.stopping.is_set():
            await asyncio.sleep(_REDIS_WATCH_SECONDS)
            for link in links:
                if not link.available or link.idle_for() >= _REDIS_IDLE_CHECK_SECONDS:
                    await link.check()
            if all(link.available for link in links):
                if "redis_unavailable" in self._paused:
                    await self._resume("redis_unavailable")
            elif "redis_unavailable" not in self._paused:
                await self._pause("redis_unavailable")

    async def _pause(self, reason: str) -> None:
        """Stop taking requests for ``reason`` (a rejected key, Clerk unavailable)."""
        self._paused.add(reason)
        if self._consumers is not None:
            await self._consumers.pause()
        await self.holds.pause()

    async def _resume(self, reason: str) -> None:
        """Take requests again once no reason to pause remains."""
        self._paused.discard(reason)
        if not self._paused and self._consumers is not None and not self.stopping.is_set():
            await self._consumers.resume()
            await self.holds.resume()


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    name: str = "sign-in-token-worker",
    started: Callable[[Worker], object] | None = None,
) -> None:
    """Run a worker until ``stop`` is set, then shut it down within the grace period.

    A stop during start-up (the broker still being retried) ends the start at once.
    ``started`` is told of the worker once it exists (SIGHUP reloads its policy).
    """
    worker = Worker(settings, name=name)
    if started is not None:
        started(worker)
    starting = asyncio.ensure_future(worker.start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopped
        else:
            log.info("stopped_during_start")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        stopped.cancel()
        await worker.shutdown()
