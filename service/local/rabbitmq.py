"""A private RabbitMQ node for the demo, the tests and the benchmarks.

It runs the operating system's ``rabbitmq-server`` with its own data
directory, loopback-only listeners and free ports, so it never touches a
system broker and several can run side by side. The node can be stopped and
started again on the same data directory, which is how the tests restart
the broker under a running worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aio_pika
from sign_in_tokens_client.contract.errors import ConfigError

_SERVER_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server")
_CTL_TIMEOUT_SECONDS = 60.0
_BOOT_TIMEOUT_SECONDS = 90.0
_STOP_TIMEOUT_SECONDS = 30.0

# Plugins off (faster boot); quorum queue counters refreshed every 500 ms so
# `rabbitmqctl list_queues` is current within a test's patience.
# The Erlang distribution listener binds to loopback too (by default it takes every address).
_ADVANCED_CONFIG = "[{kernel, [{inet_dist_use_interface, {127,0,0,1}}]},\n {rabbit, [{quorum_tick_interval, 500}]}].\n"


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_server() -> str:
    """Return the path of the rabbitmq-server start script, or raise ConfigError."""
    for path in _SERVER_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("rabbitmq-server")
    if found is None:
        msg = "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
        raise ConfigError(msg)
    return found


class LocalServer:
    """A private server that starts on entering ``async with`` and is cleaned up on leaving it."""

    async def start(self) -> None:
        """Start the server and wait until it serves."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop the server and remove its files."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and remove its files."""
        await asyncio.to_thread(self.cleanup)


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener's files (PEM): the CA that signs clients, the server's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    # Refuse clients without a certificate signed by ``ca_file``.
    require_client_cert: bool = False


class LocalBroker(LocalServer):
    """One private RabbitMQ node: start, stop, restart on the same data."""

    def __init__(self, base_dir: Path | None = None, tls: TlsListener | None = None) -> None:
        """Prepare (but do not start) a node in ``base_dir`` or a new temp dir; ``tls`` adds an amqps listener."""
        self._owns_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="sits-rabbit-"))
        self.tls = tls
        self.amqps_port = free_port() if tls else None
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.node_name = f"sits{uuid.uuid4().hex[:10]}@localhost"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        """The AMQP URL of this node."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid(self) -> int | None:
        """The node's process id (the VM itself), while it runs."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def amqps_url(self, query: str = "") -> str:
        """The amqps URL of this node's TLS listener (``localhost``, the name its certificate holds)."""
        if self.amqps_port is None:
            msg = "this node has no TLS listener"
            raise ConfigError(msg)
        return f"amqps://guest:guest@localhost:{self.amqps_port}/{'?' + query if query else ''}"

    @property
    def log_path(self) -> Path:
        """Where the node's console output goes."""
        return self.base_dir / "console.log"

    def _write_config(self) -> None:
        tls = ""
        if self.tls is not None:
            tls = (
                f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}\n"
                f"ssl_options.cacertfile = {self.tls.ca_file}\n"
                f"ssl_options.certfile = {self.tls.cert_file}\n"
                f"ssl_options.keyfile = {self.tls.key_file}\n"
                "ssl_options.verify = verify_peer\n"
                f"ssl_options.fail_if_no_peer_cert = {str(self.tls.require_client_cert).lower()}\n"
            )
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users = none\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            f"log.file = false\n{tls}",
        )
        (self.base_dir / "advanced.config").write_text(_ADVANCED_CONFIG)
        (self.base_dir / "enabled_plugins").write_text("[].\n")

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        base = self.base_dir
        env.update(
            HOME=str(base),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(base / "feature_flags"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(base / "plugins-expand"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # Makes the start script exec the VM directly, so SIGTERM stops it cleanly.
            RUNNING_UNDER_SYSTEMD="1",
        )
        env.pop("RABBITMQ_ALLOW_INPUT", None)
        return env

    def start_process(self) -> None:
        """Launch the node without waiting for it to accept connections."""
        if self._process is not None and self._process.poll() is None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed script path, no shell
                [find_server()],
                env=self._environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def start(self) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        self.start_process()
        await self.wait_ready()

    async def wait_ready(self, within: float = _BOOT_TIMEOUT_SECONDS) -> None:
        """Wait until an AMQP connection succeeds, or raise with the node's log."""
        deadline = time.monotonic() + within
        while True:
            if self._process is not None and self._process.poll() is not None:
                msg = f"RabbitMQ node exited at start; see {self.log_path}"
                raise ConfigError(msg)
            if await self._accepts_connections():
                return
            if time.monotonic() > deadline:
                msg = f"RabbitMQ node did not start within {within:.0f} s; see {self.log_path}"
                raise ConfigError(msg)
            await asyncio.sleep(0.2)

    async def _accepts_connections(self) -> bool:
        # A bare TCP check first: the AMQP client logs every refused attempt.
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.amqp_port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.url, timeout=5)
            await connection.close()
            return True
        return False

    def stop(self) -> None:
        """Stop the node gracefully (SIGTERM), killing it if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    async def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl ARGS`` against this node; return its output, raise ConfigError when it fails."""
        ctl = str(Path(find_server()).with_name("rabbitmqctl"))
        result = await asyncio.to_thread(
            subprocess.run,
            [ctl, *args],
            env=self._environment(),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=_CTL_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            msg = f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}"
            raise ConfigError(msg)
        return result.stdout

    async def stop_async(self) -> None:
        """Stop the node without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def cleanup(self) -> None:
        """Stop the node and delete its data directory if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
