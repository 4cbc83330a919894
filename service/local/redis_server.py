"""A private Redis server for the demo, the tests and the benchmarks.

It runs the operating system's ``redis-server`` on loopback, on a free port,
with its own directory and no persistence (the service keeps nothing in
Redis that outlives the idempotency window), so it never touches a system
Redis and several can run side by side. It can be stopped and started again
on the same port, which is how the tests take Redis away under a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis.asyncio
from sign_in_tokens_client.contract.errors import ConfigError

from service.local.rabbitmq import LocalServer, TlsListener, free_port

_BOOT_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0


def find_redis_server() -> str:
    """Return the path of redis-server, or raise ConfigError."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        msg = "redis-server is not installed (Debian: apt-get install redis-server)"
        raise ConfigError(msg)
    return found


class LocalRedis(LocalServer):
    """One private Redis server: start, stop, restart on the same port."""

    def __init__(self, tls: TlsListener | None = None) -> None:
        """Prepare (but do not start) a server in a new temp dir; ``tls`` adds a TLS port."""
        self.base_dir = Path(tempfile.mkdtemp(prefix="sits-redis-"))
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self._process: subprocess.Popen[bytes] | None = None

    def tls_url(self, query: str = "") -> str:
        """The rediss URL of the TLS port (``localhost``, the name its certificate holds)."""
        if self.tls_port is None:
            msg = "this server has no TLS port"
            raise ConfigError(msg)
        return f"rediss://localhost:{self.tls_port}/0{'?' + query if query else ''}"

    @property
    def url(self) -> str:
        """The REDIS_URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start_process(self) -> None:
        """Launch the server without waiting for it."""
        if self._process is not None and self._process.poll() is None:
            return
        args = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.base_dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.base_dir / "redis.log"),
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "yes" if self.tls.require_client_cert else "optional",
            ]  # fmt: skip
        self._process = subprocess.Popen(  # noqa: S603 - a fixed program, no shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.start_process()
        deadline = time.monotonic() + _BOOT_TIMEOUT_SECONDS
        client = redis.asyncio.Redis.from_url(self.url)
        try:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    msg = f"redis-server exited at start; see {self.base_dir / 'redis.log'}"
                    raise ConfigError(msg)
                with contextlib.suppress(redis.RedisError, OSError):
                    if await client.ping():
                        return
                if time.monotonic() > deadline:
                    msg = f"redis-server did not start within {_BOOT_TIMEOUT_SECONDS:.0f} s"
                    raise ConfigError(msg)
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it hangs)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
