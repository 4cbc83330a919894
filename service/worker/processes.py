"""Several worker processes on one machine: ``sign-in-tokens worker --processes N``.

One Python process uses one core; a pod or machine with more runs N workers,
each a ``sign-in-tokens worker`` of its own with its own broker connection.
This supervisor starts them, passes SIGTERM, SIGINT and SIGHUP on to each,
and waits. If one ends while no stop was asked, it stops the others and exits
with that worker's code, so the orchestrator restarts the whole set rather
than run it short a worker.

Process ``k`` serves ``/healthz``, ``/readyz`` and ``/metrics`` on
``HTTP_PORT + k``. The processes share the rate limit and the idempotency
store through ``REDIS_URL``, which is why more than one process needs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType
from typing import Final

import structlog

log = structlog.get_logger(__name__)

_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG: Final = 1
# After SIGTERM, how long the supervisor waits beyond the workers' own grace period.
_KILL_MARGIN_SECONDS: Final = 5.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to send SIGTERM to this worker if the supervisor dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_port(http_port: int, index: int) -> int:
    """The health port of worker ``index`` (0 stays 0: each picks a free port)."""
    return http_port + index if http_port else 0


def run_processes(count: int, environ: Mapping[str, str], http_port: int, grace_seconds: float) -> int:
    """Run ``count`` workers until a signal stops them or one ends; return the exit code."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "service", "worker"],
            env={**environ, "HTTP_PORT": str(worker_port(http_port, index))},
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - a single call, no locks taken
        )
        for index in range(count)
    ]
    stopping = False

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    log.info("worker_processes_started", processes=count, pids=[w.pid for w in workers])
    code = 0
    running = {worker.pid: worker for worker in workers}
    while running:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker = running.pop(pid, None)
        if worker is None:
            continue
        worker.returncode = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("worker_process_ended", pid=pid, exit_code=worker.returncode, action="stopping the others")
            code = worker.returncode if worker.returncode > 0 else 1  # killed by a signal: 1
            forward(signal.SIGTERM, None)
            _kill_after(list(running.values()), grace_seconds + _KILL_MARGIN_SECONDS)
            break
    return code


def _kill_after(workers: list[subprocess.Popen[bytes]], seconds: float) -> None:
    """Wait for ``workers`` to end; kill those still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
