"""Throughput benchmark: the service against its peers, in one run, interleaved, medians of several rounds.

Contenders: the naive aio-pika worker and the FastStream subscriber of
``benchmarks/peers/``, the service with default settings (info logging to a
pipe, metrics, quorum queues, the in-process idempotency store), the service
with REDIS_URL (shared rate limit set far above the load, shared idempotency
store), the service as two processes (``worker --processes 2``), and the
service draining actor tokens (impersonations on IMPERSONATION_QUEUE, under a
policy that allows them) beside its sign-in token drain under the same policy.

For each Clerk latency (the fake Clerk in its own process) and each round,
every contender in turn, the order rotated each round:

- drain: --requests requests preloaded into a quorum queue declared as the
  service declares its lanes, the contender started, and timed from its first
  reply to its last (the reply queue's depth polled every 20 ms); its CPU
  (all its processes) and the broker's over that span; its peak RSS;
- alone: then, the same process idle, --solo requests one at a time: the
  round trip's p50 and p99, and what it adds to Clerk's latency.

    uv run python benchmarks/throughput.py                     # 20,000 requests, 0 and 50 ms, 3 rounds
    uv run python benchmarks/throughput.py -n 5000 --rounds 1 --latency-ms 0 --only service --only naive
    uv run python benchmarks/throughput.py --kinds -n 10000 --rounds 5 --latency-ms 0   # actor beside sign-in tokens
    uv run python benchmarks/throughput.py --sealed -n 10000 --rounds 5 --latency-ms 0  # sealed replies beside plain

Writes benchmarks/results/throughput.json and docs/images/throughput.png (``--kinds``:
throughput-kinds.json and docs/images/throughput-kinds.png; ``--sealed``: throughput-sealed.*,
and what opening a box costs a client).
With AMQP_URL set it uses that broker (the broker's CPU is then not read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import psutil
from drain import ROOT, actor_body, preload, queue_names, sign_in_body, wait_http
from nacl.public import PrivateKey
from sign_in_tokens_client.connection import broker_user
from sign_in_tokens_client.sealing import Sealer, encoded, generate_key_file

from service.amqp.topology import lane_queue_arguments
from service.config import load_settings
from service.local.rabbitmq import LocalBroker, free_port
from service.local.redis_server import LocalRedis

KEY = "sk_live_" + "t" * 32
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "images" / "throughput.png"
PEERS = ROOT / "benchmarks" / "peers"
POLL_SECONDS = 0.02
SERVICE = (sys.executable, "-m", "service")
WORKER = (*SERVICE, "worker")
# The policy of the two contenders that compare the kinds of token: any caller, either kind.
POLICY = """\
[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 3600
reply_to = ["*"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
"""


@dataclass(frozen=True)
class Contender:
    """A worker to measure: how to start it, and what it needs."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    redis: bool = False
    service: bool = False
    # Where it runs from: another tree of the service (``--baseline``) is imported from its own directory.
    cwd: Path = ROOT
    # What it is asked for: sign-in tokens on REQUEST_QUEUE, or actor tokens on IMPERSONATION_QUEUE;
    # under a policy (``POLICY``, each request naming its publisher) or none.
    kind: str = "sign_in_token"
    policy: bool = False
    # Sealed replies (contract v3): the policy gives every caller a reply key, the worker a sealing key.
    sealed: bool = False

    @property
    def queue(self) -> str:
        """The variable of the queue it drains."""
        return "IMPERSONATION_QUEUE" if self.kind == "actor_token" else "REQUEST_QUEUE"

    @property
    def body(self) -> Callable[[int], bytes]:
        """The n-th request's body."""
        return actor_body if self.kind == "actor_token" else sign_in_body


CONTENDERS = {
    "naive": Contender("naive aio-pika", [sys.executable, str(PEERS / "naive_aio_pika.py")]),
    "faststream": Contender("FastStream", [sys.executable, str(PEERS / "faststream_subscriber.py")]),
    "service": Contender("service", [*WORKER], service=True),
    "service-redis": Contender("service + Redis", [*WORKER], redis=True, service=True),
    # More than one process shares the limit and the idempotency store through Redis.
    "service-2p": Contender("service, 2 processes", [*WORKER, "--processes", "2"], redis=True, service=True),
    # The two kinds of token, side by side, under the same policy.
    "service-policy": Contender("service, sign-in tokens, policy", [*WORKER], service=True, policy=True),
    "service-actor": Contender(
        "service, actor tokens, policy", [*WORKER], service=True, policy=True, kind="actor_token"
    ),
    # Every reply sealed to its caller's key, beside the same policy without one.
    "service-sealed": Contender("service, sealed replies, policy", [*WORKER], service=True, policy=True, sealed=True),
}


@dataclass
class Run:
    """One contender's figures in one round at one latency."""

    contender: str
    latency_ms: float
    round: int
    tokens: int
    seconds: float
    cpu_seconds: float
    broker_cpu_seconds: float | None
    peak_rss_mib: float
    solo_ms: list[float]

    @property
    def tokens_per_second(self) -> float:
        """Replies a second, first reply to last."""
        return self.tokens / self.seconds

    @property
    def cpu_us_per_token(self) -> float:
        """The contender's CPU per reply."""
        return self.cpu_seconds / self.tokens * 1e6

    @property
    def broker_cpu_us_per_token(self) -> float | None:
        """The broker's CPU per reply, when the broker is ours."""
        return None if self.broker_cpu_seconds is None else self.broker_cpu_seconds / self.tokens * 1e6


def tree(process: psutil.Process) -> list[psutil.Process]:
    """A process and its children."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [process, *process.children(recursive=True)]
    return []


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU of ``processes``."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def peak_rss_mib(processes: list[psutil.Process]) -> float:
    """The sum of the processes' peak resident set sizes (VmHWM)."""
    total = 0
    for process in processes:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return total / 1024


def broker_process(broker: LocalBroker | None) -> psutil.Process | None:
    """The Erlang VM of our private node."""
    if broker is None:
        return None
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "beam.smp" and str(broker.base_dir) in " ".join(process.info["cmdline"] or []):
            return process
    return None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Solo:
    """Requests one at a time, each round trip timed."""

    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        queue: str,
        body: Callable[[int], bytes] = sign_in_body,
        user_id: str | None = None,
    ) -> None:
        """Publish ``body(n)`` as ``user_id`` to ``queue`` on ``channel``; replies to an exclusive queue of our own."""
        self.channel = channel
        self.queue = queue
        self.body = body
        self.user_id = user_id
        self.pending: dict[str, asyncio.Future[float]] = {}
        # The replies' x-sealed headers seen (None: a plain reply): what a contender really did.
        self.sealed: set[object] = set()

    async def run(self, count: int) -> list[float]:
        """Round trips in milliseconds."""
        replies = await self.channel.declare_queue(exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = self.pending.pop(message.correlation_id or "", None)
            self.sealed.add((message.headers or {}).get("x-sealed"))
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

        tag = await replies.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()
        times = []
        for i in range(count):
            correlation_id = uuid.uuid4().hex
            self.pending[correlation_id] = future = loop.create_future()
            started = time.perf_counter()
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    self.body(1_000_000 + i),
                    correlation_id=correlation_id,
                    message_id=correlation_id,
                    reply_to=replies.name,
                    user_id=self.user_id,
                ),
                self.queue,
            )
            times.append((await asyncio.wait_for(future, 30) - started) * 1000)
        await replies.cancel(tag)
        return times


async def drain(
    amqp_url: str,
    contender: Contender,
    env: dict[str, str],
    requests: int,
    solo: int,
    broker: psutil.Process | None,
    timeout: float,  # noqa: ASYNC109
    profile: Path | None = None,
) -> tuple[int, float, float, float | None, float, list[float]]:
    """Preload, start the contender, time its drain, then its round trips alone.

    With ``profile``, py-spy samples the contender from its first reply to its last, into that file.
    """
    tag = f"tp{uuid.uuid4().hex[:8]}"
    queues = queue_names(tag)
    reply_queue = f"{tag}.replies"
    settings = load_settings({**queues, "CLERK_SECRET_KEY": KEY})
    connection = await aio_pika.connect(amqp_url)
    # Under a policy each request names its publisher (RabbitMQ checks it): the connection's user.
    user_id = broker_user(amqp_url) if contender.policy else None
    queue = queues[contender.queue]
    async with connection:
        channel = await connection.channel()
        arguments = lane_queue_arguments(settings)
        await preload(amqp_url, queue, reply_queue, requests, arguments, body=contender.body, user_id=user_id)
        worker = subprocess.Popen(  # noqa: S603, ASYNC220 - our own scripts, started once a run
            contender.command,
            env={**env, **queues, "HTTP_PORT": str(free_port())},
            cwd=contender.cwd,
            stdout=subprocess.DEVNULL,
            # The service logs a line a request; a peer is silent unless it fails, and then it should be seen.
            stderr=subprocess.PIPE if contender.service else None,
        )
        # Its log lines go to a pipe read by a thread, as a log collector would read them.
        reader = asyncio.create_task(asyncio.to_thread(_discard, worker.stderr)) if worker.stderr else None
        process = psutil.Process(worker.pid)
        spy: list[subprocess.Popen[bytes]] = []

        def on_first() -> None:
            if profile is not None:
                spy.append(start_py_spy(worker.pid, profile))

        try:
            first = await _count_replies(channel, reply_queue, requests, timeout, process, broker, on_first)
            for sampler in spy:
                sampler.send_signal(signal.SIGINT)
                await asyncio.to_thread(sampler.wait, 60)
            alone = Solo(channel, queue, contender.body, user_id)
            solo_ms = await alone.run(solo)
            if contender.service and solo and alone.sealed != {"nacl-box" if contender.sealed else None}:
                msg = f"{contender.name}: replies sealed {alone.sealed}, not as the contender says"
                raise RuntimeError(msg)
        finally:
            worker.terminate()
            try:
                await asyncio.to_thread(worker.wait, 30)
            except subprocess.TimeoutExpired:
                worker.kill()
            if reader is not None:
                await reader
            for name in (*queues.values(), reply_queue):
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name)
    return (*first, solo_ms)


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` and its children, raw collapsed stacks, until SIGINT."""
    output.parent.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [
        str(py_spy),
        "record",
        "-p",
        str(pid),
        "-s",
        "-r",
        "250",
        "--nonblocking",
        "-f",
        "raw",
        "-o",
        str(output),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


def _discard(pipe: Any) -> None:  # noqa: ANN401 - a binary pipe
    while pipe.read(65536):
        pass


async def _count_replies(
    channel: aio_pika.abc.AbstractChannel,
    reply_queue: str,
    requests: int,
    timeout: float,  # noqa: ASYNC109
    process: psutil.Process,
    broker: psutil.Process | None,
    on_first: Callable[[], None],
) -> tuple[int, float, float, float | None, float]:
    """Poll the reply queue: figures from the first poll that sees a reply to the one that sees them all."""
    started = time.monotonic()
    first: tuple[float, int, float, float | None] | None = None
    while True:
        queue = await channel.declare_queue(reply_queue, passive=True)
        count = int(queue.declaration_result.message_count or 0)
        now = time.monotonic()
        if count and first is None:
            first = (now, count, cpu_seconds(tree(process)), cpu_seconds([broker]) if broker else None)
            on_first()
        if count >= requests and first is not None:
            t0, n0, cpu0, broker0 = first
            processes = tree(process)
            broker_cpu = None if broker is None or broker0 is None else cpu_seconds([broker]) - broker0
            return requests - n0, now - t0, cpu_seconds(processes) - cpu0, broker_cpu, peak_rss_mib(processes)
        if now - started > timeout:
            msg = f"only {count} of {requests} replies after {timeout} s"
            raise RuntimeError(msg)
        await asyncio.sleep(POLL_SECONDS)


def summary(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Medians per latency and contender (keys ``'<latency>|<contender>'``)."""
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(f"{run.latency_ms:g}|{run.contender}", []).append(run)
    out = {}
    for key, group in grouped.items():
        solo = [ms for run in group for ms in run.solo_ms]
        latency = group[0].latency_ms
        broker = [run.broker_cpu_us_per_token for run in group if run.broker_cpu_us_per_token is not None]
        out[key] = {
            "contender": group[0].contender,
            "latency_ms": latency,
            "rounds": len(group),
            "tokens_per_second": statistics.median(run.tokens_per_second for run in group),
            "cpu_us_per_token": statistics.median(run.cpu_us_per_token for run in group),
            "broker_cpu_us_per_token": statistics.median(broker) if broker else None,
            "peak_rss_mib": max(run.peak_rss_mib for run in group),
            "solo_p50_ms": percentile(solo, 50) if solo else None,
            "solo_p99_ms": percentile(solo, 99) if solo else None,
            "added_p50_ms": percentile(solo, 50) - latency if solo else None,
        }
    return out


def table(medians: dict[str, dict[str, Any]], baseline: str) -> Iterator[str]:
    """Markdown rows, with ratios to ``baseline`` at the same latency."""
    ratio = "x naive" if baseline == "naive" else "x sign-in"
    yield (
        f"| Clerk latency | worker | tokens/s | {ratio} | worker CPU µs/token | {ratio} | broker CPU µs/token "
        "| alone p50 / p99 (ms) | added p50 (ms) | peak RSS (MiB) |"
    )
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for row in medians.values():
        base = medians.get(f"{row['latency_ms']:g}|{baseline}")
        speed = row["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        cpu = row["cpu_us_per_token"] / base["cpu_us_per_token"] if base else float("nan")
        broker = row["broker_cpu_us_per_token"]
        yield (
            f"| {row['latency_ms']:g} ms | {CONTENDERS[row['contender']].name} "
            f"| {row['tokens_per_second']:,.0f} | {speed:.2f} "
            f"| {row['cpu_us_per_token']:,.0f} | {cpu:.2f} | {'' if broker is None else f'{broker:,.0f}'} "
            f"| {row['solo_p50_ms']:.2f} / {row['solo_p99_ms']:.2f} | {row['added_p50_ms']:.2f} "
            f"| {row['peak_rss_mib']:.0f} |"
        )


def plot(medians: dict[str, dict[str, Any]], latencies: list[float], names: list[str], path: Path = PLOT) -> None:
    """Tokens/s and CPU per token, a group of bars per Clerk latency."""
    import matplotlib as mpl  # noqa: PLC0415 - only the plot needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (speed, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [medians.get(f"{latency:g}|{name}") for latency in latencies]
        xs = [j + i * width for j in range(len(latencies))]
        label = CONTENDERS[name].name
        speed.bar(xs, [r["tokens_per_second"] if r else 0 for r in rows], width, label=label)
        cpu.bar(xs, [r["cpu_us_per_token"] if r else 0 for r in rows], width, label=label)
    for ax, title in ((speed, "tokens/s (higher is better)"), (cpu, "worker CPU µs per token (lower is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(latencies))])
        ax.set_xticklabels([f"Clerk {latency:g} ms" for latency in latencies])
        ax.set_title(title)
    speed.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def save(
    args: argparse.Namespace,
    runs: list[Run],
    medians: dict[str, dict[str, Any]],
    latencies: list[float],
    names: list[str],
) -> None:
    """Write the JSON and the plot; a before-and-after run is kept beside the comparison with the peers."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    mode = "-kinds" if args.kinds else "-sealed" if args.sealed else ""
    stem = "throughput-baseline" if args.baseline else f"throughput{mode}"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"args": vars(args), "medians": medians, "runs": [asdict(run) for run in runs]}, indent=2)
    )
    plot(medians, latencies, names, PLOT.with_name(f"{stem}.png"))


def write_policies(files: Path) -> tuple[Path, Path, Path]:
    """The policy of the policy contenders, the same sealing every reply, and the worker's sealing key."""
    policy, sealed_policy, sealing_key = files / "policy.toml", files / "sealed.toml", files / "sealing.key"
    policy.write_text(POLICY)
    generate_key_file(sealing_key)
    caller = PrivateKey.generate()
    sealed_policy.write_text(f'{POLICY}reply_public_key = "{encoded(bytes(caller.public_key))}"\n')
    return policy, sealed_policy, sealing_key


def opening_us(count: int = 2_000, rounds: int = 5) -> float:
    """What opening one sealed reply costs a client (its box decrypted, its bound fields checked), in µs: a median."""
    service, caller = PrivateKey.generate(), PrivateKey.generate()
    token = "eyJhbGciOiJSUzI1NiJ9." + "a" * 600 + ".signature"
    bound = {
        "id": "sit_1",
        "user_id": "user_1",
        "caller": "c",
        "correlation_id": "x",
        "message_id": "x",
        "instance": "default",
    }
    sealed = Sealer(bytes(service)).seal(bytes(caller.public_key), token, f"https://accounts.example/?t={token}", bound)
    opener = Sealer(bytes(caller))
    senders = [bytes(service.public_key)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            opener.open(senders, sealed, bound)
        times.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(times)


def add_baseline(revision: str, tree: Path, *, redis: bool) -> list[str]:
    """Export the ``service`` package at ``revision`` into ``tree``; add it as a contender, return its keys.

    ``python -m service`` run from ``tree`` imports that copy: the current directory comes first on ``sys.path``.
    ``redis``: also the same with REDIS_URL, beside the ``service-redis`` contender.
    """
    archive = subprocess.run(  # noqa: S603 - git, fixed arguments
        ["git", "archive", revision, "service"],  # noqa: S607 - git from PATH, as a developer runs it
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)  # noqa: S603, S607
    CONTENDERS["baseline"] = Contender(f"service at {revision}", [*WORKER], service=True, cwd=tree)
    if not redis:
        return ["baseline"]
    name = f"service + Redis at {revision}"
    CONTENDERS["baseline-redis"] = Contender(name, [*WORKER], redis=True, service=True, cwd=tree)
    return ["baseline", "baseline-redis"]


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("--solo", type=int, default=100, help="requests one at a time after each drain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, action="append", help="fake Clerk latency; repeatable")
    parser.add_argument("--only", action="append", choices=sorted(CONTENDERS), help="contenders; repeatable")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a drain after this many seconds")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy each drain into benchmarks/results/profile/ (figures then include its cost: not for the table)",
    )
    parser.add_argument(
        "--kinds",
        action="store_true",
        help="the two kinds of token side by side (sign-in and actor tokens, under one policy), saved as "
        "throughput-kinds.json and .png",
    )
    parser.add_argument(
        "--sealed",
        action="store_true",
        help="sealed replies beside plain ones (one policy, every caller sealed in the one), saved as "
        "throughput-sealed.json and .png",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the service as of git revision REV (its package exported to a temp dir): before and after, "
        "interleaved in one run",
    )
    return parser.parse_args()


async def main() -> None:
    """Run every round, print the table, write the JSON and the plot."""
    args = parse_args()
    latencies = args.latency_ms or [0.0, 50.0]
    pairs = {"kinds": ["service-policy", "service-actor"], "sealed": ["service-policy", "service-sealed"]}
    mode = "kinds" if args.kinds else "sealed" if args.sealed else None
    default = [name for name in CONTENDERS if name != "service-sealed"]
    chosen = args.only or (pairs[mode] if mode else default)
    runs: list[Run] = []
    async with AsyncExitStack() as stack:
        if args.baseline:
            tree = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            chosen.extend(add_baseline(args.baseline, tree, redis="service-redis" in chosen))
        policy, sealed_policy, sealing_key = write_policies(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        amqp_url = os.environ.get("AMQP_URL")
        local = None
        if not amqp_url:
            local = await stack.enter_async_context(LocalBroker())
            amqp_url = local.url
        broker = broker_process(local)
        redis_url = ""
        if any(CONTENDERS[name].redis for name in chosen):
            redis = LocalRedis()
            await redis.start()
            stack.callback(redis.stop)
            redis_url = redis.url
        for latency in latencies:
            clerk_port = free_port()
            clerk = subprocess.Popen(  # noqa: S603, ASYNC220 - our own module, started once a latency
                [
                    sys.executable,
                    "-m",
                    "service",
                    "fake-clerk",
                    "--port",
                    f"{clerk_port}",
                    "--latency-ms",
                    f"{latency}",
                ],
                env={**os.environ, "CLERK_SECRET_KEY": KEY, "LOG_LEVEL": "warning"},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(clerk.terminate)
            await wait_http(f"http://127.0.0.1:{clerk_port}/v1/sign_in_tokens", 30)
            base_env = {
                **os.environ,
                "AMQP_URL": amqp_url,
                "CLERK_API_URL": f"http://127.0.0.1:{clerk_port}/v1",
                "CLERK_SECRET_KEY": KEY,
                "LOG_LEVEL": "info",
                "LOG_FORMAT": "json",
                # Far above the load: the benchmark measures the worker, not Clerk's limit.
                "CLERK_RATE_LIMIT": "1000000",
            }
            for round_ in range(args.rounds):
                order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
                for name in order:
                    contender = CONTENDERS[name]
                    env = {
                        **base_env,
                        **({"REDIS_URL": redis_url} if contender.redis else {}),
                        **({"POLICY_FILE": str(policy)} if contender.policy else {}),
                        **(
                            {"POLICY_FILE": str(sealed_policy), "REPLY_SEALING_KEY_FILE": str(sealing_key)}
                            if contender.sealed
                            else {}
                        ),
                    }
                    profile = RESULTS / "profile" / f"{name}-{latency:g}ms.txt" if args.profile else None
                    tokens, seconds, cpu, broker_cpu, rss, solo = await drain(
                        amqp_url, contender, env, args.requests, args.solo, broker, args.timeout, profile
                    )
                    run = Run(name, latency, round_, tokens, seconds, cpu, broker_cpu, rss, solo)
                    runs.append(run)
                    print(
                        f"{latency:g} ms round {round_ + 1} {contender.name}: {run.tokens_per_second:,.0f} tokens/s, "
                        f"{run.cpu_us_per_token:,.0f} µs CPU/token, alone p50 {percentile(solo, 50):.2f} ms",
                        flush=True,
                    )
            clerk.terminate()
    medians = summary(runs)
    print("\n".join(table(medians, "service-policy" if mode else "naive")))
    if args.sealed:
        medians["opening"] = {"client_open_us": opening_us()}
        print(f"a client opens a sealed reply in {medians['opening']['client_open_us']:.1f} µs (median of 5 x 2,000)")
    if args.profile:
        print("profiles in", RESULTS / "profile", "(benchmarks/breakdown.py reads them); figures not saved")
        return
    save(args, runs, medians, latencies, chosen)


if __name__ == "__main__":
    asyncio.run(main())
