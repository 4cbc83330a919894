"""The Clerk instances a worker serves: each one's upstream built, measured and reported; read again at SIGHUP.

``lifecycle.py`` owns one ``ClerkInstances``: it builds an ``Upstream`` (client, rate limiter,
breaker) for each instance of CLERK_INSTANCES_FILE (or the one of CLERK_SECRET_KEY), exports
each instance's series, answers /readyz's ``instances``, and on SIGHUP reads the file and every key
file again, putting a changed instance's new client in place of the old one (``reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog
from sign_in_tokens_client.contract.errors import ConfigError, ShutdownRequestedError
from sign_in_tokens_client.contract.lanes import Lane

from service.clerk.instances import Instance, load_instances
from service.clerk.upstreams import OnInstance, Upstream, build_upstream
from service.config import Settings
from service.logs import SCRUBBER
from service.worker.health import Metrics

if TYPE_CHECKING:
    from service.worker.holds import InstanceHolds
    from service.worker.parts import Parts

log = structlog.get_logger(__name__)


class ClerkInstances:
    """Build, measure, report and reload the worker's Clerk instances."""

    def __init__(
        self, settings: Settings, metrics: Metrics, stopping: asyncio.Event, on_down: OnInstance, on_up: OnInstance
    ) -> None:
        """``on_down``/``on_up`` are told an instance's name as its breaker opens and closes."""
        self.settings = settings
        self.metrics = metrics
        self.stopping = stopping
        self._on_down = on_down
        self._on_up = on_up
        self._parts: Parts | None = None
        self._holds: InstanceHolds | None = None
        self._reloading = asyncio.Lock()
        # Clients a reload replaced, closing once the calls they may have sent are answered.
        self.tasks: set[asyncio.Task[None]] = set()

    def build(self, instances: dict[str, Instance]) -> dict[str, Upstream]:
        """An upstream for each instance, its series exported from the start."""
        self.metrics.instances(instances)
        self._measure_waiting(instances)
        return {name: self._upstream(instance) for name, instance in instances.items()}

    def attach(self, parts: Parts, holds: InstanceHolds) -> None:
        """The parts the upstreams serve in, and the hold queues a new instance gets."""
        self._parts = parts
        self._holds = holds

    @property
    def parts(self) -> Parts:
        """The parts the upstreams serve in (``attach``)."""
        if self._parts is None:
            msg = "ClerkInstances.attach() was not called"
            raise RuntimeError(msg)
        return self._parts

    def _upstream(self, instance: Instance, succeeds: Upstream | None = None) -> Upstream:
        SCRUBBER.add_secret(instance.secret_key.reveal())  # never in a log line, whatever carries it
        return build_upstream(
            self.settings,
            instance,
            observe=functools.partial(self._observe, instance.name),
            on_cut=self.metrics.ambiguous_creates.inc,
            on_open=self._on_down,
            on_close=self._on_up,
            stopping=self.stopping,
            succeeds=succeeds,
        )

    def _observe(self, instance: str, operation: str, seconds: float) -> None:
        self.metrics.labelled(self.metrics.upstream_latency, operation, instance).observe(seconds)

    def _measure_waiting(self, names: Iterable[str]) -> None:
        """``sign_in_tokens_rate_limit_waiting`` of each lane at each of these instances."""
        for name in names:
            for lane in Lane:
                self.metrics.labelled(self.metrics.rate_limit_waiting, lane.value, name).set_function(
                    functools.partial(self._rate_limit_waiting, name, lane)
                )

    def _rate_limit_waiting(self, instance: str, lane: Lane) -> int:
        """Requests waiting for a rate slot on ``lane`` at ``instance`` (0 once it is gone)."""
        upstream = self.parts.upstreams.get(instance)
        return 0 if upstream is None else upstream.clerk.limiter.waiting(lane)

    def readiness(self) -> dict[str, dict[str, bool]]:
        """Each Clerk instance's checks, in /readyz and ``sign_in_tokens_instance_check``."""
        return {
            name: {"key_ok": upstream.key_ok, "upstream_available": not upstream.breaker.is_open}
            for name, upstream in self.parts.upstreams.items()
        }

    def stop_sending(self) -> None:
        """Shutdown: no call to Clerk starts any more, at any instance."""
        for upstream in self.parts.upstreams.values():
            upstream.clerk.stop_sending()

    async def stop_probing(self) -> None:
        """Shutdown: every breaker's probe ends."""
        for upstream in self.parts.upstreams.values():
            await upstream.breaker.close()

    async def close(self) -> None:
        """Shutdown: every client's connections closed."""
        for upstream in self.parts.upstreams.values():
            await upstream.clerk.close()

    async def reload(self) -> bool:
        """Read CLERK_INSTANCES_FILE and every key file again (SIGHUP), one reload at a time."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> bool:
        """A bad file keeps the instances in force, and says why.

        An instance whose key, URL or limit changed gets a new client, which takes over the old
        one's turns, breaker and (while the limit is the same) rate limiter; calls already at Clerk
        finish with the key they started with, and the old client is closed after them. A new
        instance gets its hold queues; one removed is served no more: the requests waiting for its
        slot, or held, are answered ``invalid_request``.
        """
        try:
            instances = load_instances(self.settings, self.settings.clerk_instances_file)
        except ConfigError as exc:
            log.error("instances_reload_failed", reason=str(exc), action="keeping the instances in force")  # noqa: TRY400
            return False
        parts = self.parts
        old = parts.upstreams
        upstreams: dict[str, Upstream] = {}
        for name, instance in instances.items():
            current = old.get(name)
            if current is not None and current.instance == instance:
                upstreams[name] = current
                continue
            upstream = self._upstream(instance, succeeds=current)
            await upstream.clerk.start()
            upstreams[name] = upstream
            if current is None and self._holds is not None and parts.holding:
                await self._holds.add(name)
        parts.serve(upstreams)
        self.metrics.instances(upstreams)
        self._measure_waiting(upstreams)
        for name, upstream in old.items():
            if upstreams.get(name) is upstream:
                continue
            removed = name not in upstreams
            if removed:
                upstream.clerk.remove()
                self.metrics.forget_instance(name)
            task = asyncio.create_task(self._retire(upstream, removed=removed))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        log.info(
            "instances_reloaded",
            clerk_instances=sorted(upstreams),
            changed=sorted(name for name, upstream in upstreams.items() if old.get(name) is not upstream),
            removed=sorted(set(old) - set(upstreams)),
        )
        if self._holds is not None:
            await self._holds.follow()
        return True

    async def _retire(self, upstream: Upstream, *, removed: bool) -> None:
        """Close a client replaced by a reload, once the calls it may have started are answered.

        The breaker goes on in the successor, but for an instance ``removed``.
        """
        if removed:
            await upstream.breaker.close()
        with contextlib.suppress(ShutdownRequestedError):
            await self.parts.sleep_unless_stopping(
                self.settings.request_timeout_seconds + self.settings.connect_timeout_seconds
            )
        await upstream.clerk.close()
