"""Build the Dockerfile's image with podman and run it as an operator would: the long check of the image.

There is no Docker daemon or registry here, so the image is built by podman (``--format docker``
keeps the HEALTHCHECK) from the Dockerfile unchanged, on stand-ins for its two base images made
on this machine: ``python:3.11-slim-bookworm`` bootstrapped by mmdebstrap (Debian's python3 is
3.11, with this machine's CA bundle, which a TLS-inspecting proxy may need), and
``ghcr.io/astral-sh/uv`` holding the local uv binary of the pinned version. The ``runc`` runtime
is used (crun cannot set rlimits in a sandbox without CAP_SYS_RESOURCE), with a containers.conf
whose default ulimits stay under this machine's hard limits (podman's own defaults are above
them), and no health check timer (there is no systemd to run it: the check is run by hand).

Then the image is run read-only as its non-root user against a private RabbitMQ node and the
fake Clerk (host networking, everything on loopback): its HEALTHCHECK is run, one token is asked
for through it, ``bulk`` runs in it on a mounted directory, and it is stopped with its STOPSIGNAL.
It prints its figures (build time, image size, stop time) and writes them to
benchmarks/results/image-check.json.

    scripts/image-check          # about 40 s the first time (the base images), 15 s after that
    scripts/image-check --cold   # everything again: the bases, and the build with no layer reused

Without podman (or mmdebstrap, runc) it says why and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import aiohttp
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.connection import broker_user

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
IMAGE = f"sign-in-token-service:{VERSION}"  # the tag the manifests and the docs use
BASE = "docker.io/library/python:3.11-slim-bookworm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sign-in-tokens-image-check"
KEY = "sk_test_" + "i" * 32
USER = "10001"
OPERATOR = "10002"  # an operator's own uid, not the image's: bulk runs as the docs say (--user)
RUNTIME = ("--runtime", "runc")


def say(text: str) -> None:
    """One line of progress."""
    print(f"image-check: {text}", flush=True)


def run(*command: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A command to its end, its output captured."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]  # noqa: S603
    if check and done.returncode != 0:
        sys.exit(f"image-check: {' '.join(command[:3])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def use_containers_conf(folder: Path) -> None:
    """Podman's default ulimits within this process's hard limits (raising them needs CAP_SYS_RESOURCE)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1] - 1)
    conf = folder / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n', encoding="utf-8"
    )
    os.environ["CONTAINERS_CONF"] = str(conf)


def missing_tools() -> list[str]:
    """The programs this check needs that are not here."""
    return [tool for tool in ("podman", "mmdebstrap", "runc") if shutil.which(tool) is None]


def uv_pin() -> str:
    """The uv version the Dockerfile copies its binary from."""
    match = re.search(r"ghcr\.io/astral-sh/uv:([0-9.]+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    if match is None:
        sys.exit("image-check: the Dockerfile names no ghcr.io/astral-sh/uv image")
    return match.group(1)


def have_image(name: str) -> bool:
    """Whether podman has ``name``."""
    return run("podman", "image", "exists", name, check=False).returncode == 0


def make_bases() -> None:
    """The two base images, stood in for on this machine (made once, kept in podman's store)."""
    if not have_image(BASE):
        CACHE.mkdir(parents=True, exist_ok=True)
        tar = CACHE / "base.tar"
        say("bootstrapping a bookworm base with python3 (mmdebstrap, about a minute)")
        run(
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "--customize-hook=copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs",
            "bookworm",
            str(tar),
        )
        run("podman", "import", "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", str(tar), BASE)
        tar.unlink()
    pin = uv_pin()
    uv_image = f"ghcr.io/astral-sh/uv:{pin}"
    if not have_image(uv_image):
        uv = shutil.which("uv")
        if uv is None or pin not in run(uv, "--version").stdout:
            sys.exit(f"image-check: the Dockerfile pins uv {pin}; install that version (pip install uv=={pin})")
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(uv, Path(folder) / "uv")
            run("tar", "-C", folder, "-cf", f"{folder}/uv.tar", "uv")
            run("podman", "import", f"{folder}/uv.tar", uv_image)


def build(*, cold: bool) -> float:
    """Build the image from the Dockerfile as it is (``cold``: no layer reused); the seconds it took."""
    started = time.monotonic()
    fresh = ("--no-cache",) if cold else ()
    run("podman", *RUNTIME, "build", "--format", "docker", "--network", "host", *fresh, "-t", IMAGE, str(ROOT))
    return time.monotonic() - started


def inspect(name: str, template: str, *, container: bool = False) -> str:
    """One field of an image's or a container's description."""
    return run("podman", "container" if container else "image", "inspect", "--format", template, name).stdout.strip()


async def arun(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``run``, in a thread: the fake Clerk and the broker's client live on this event loop."""
    return await asyncio.to_thread(run, *command, check=check)


async def wait_ready(port: int, seconds: float = 60.0) -> None:
    """Until /readyz on ``port`` answers 200."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    sys.exit(f"image-check: the container was not ready on port {port} within {seconds:g} s")


def last_line(text: str) -> str:
    """What a command said last (podman's own complaints about systemd left out)."""
    lines = [line for line in text.strip().splitlines() if "level=error" not in line]
    return lines[-1] if lines else ""


def options(**env: str) -> list[str]:
    """An environment as ``-e`` options."""
    return [option for name, value in env.items() for option in ("-e", f"{name}={value}")]


def worker_env(broker: LocalBroker, clerk: FakeClerk, port: int) -> list[str]:
    """The worker container's environment, as ``-e`` options."""
    return options(
        AMQP_URL=broker.url,
        CLERK_API_URL=clerk.url,
        CLERK_SECRET_KEY_FILE="/run/secrets/clerk",
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(port),
        LOG_FORMAT="json",
    )


async def exercise(folder: Path) -> dict[str, object]:
    """Run the image against a private broker and the fake Clerk; what it did."""
    key_file = folder / "clerk"
    key_file.write_text(KEY, encoding="utf-8")
    # As a Kubernetes secret volume with fsGroup, or a Compose secret owned by the image's user.
    os.chown(key_file, int(USER), int(USER))
    key_file.chmod(0o400)
    clerk = FakeClerk(KEY)
    await clerk.start()
    async with LocalBroker() as broker:
        port = free_port()
        started = (await arun(
            "podman", *RUNTIME, "run", "-d", "--log-driver", "k8s-file", "--network", "host",
            "--read-only", "--read-only-tmpfs=false",
            "--health-interval", "disable",
            "-v", f"{key_file}:/run/secrets/clerk:ro", *worker_env(broker, clerk, port), IMAGE,
        )).stdout.strip()  # fmt: skip
        try:
            await wait_ready(port)
            user = (await arun("podman", "exec", started, "id", "-u")).stdout.strip()
            # Read-only as Docker and Kubernetes make it: no writable /tmp either.
            tmp = await arun("podman", "exec", started, "python", "-c", "open('/tmp/x', 'w')", check=False)
            health = (await arun("podman", "healthcheck", "run", started, check=False)).returncode
            async with SignInTokenClient(broker.url, service_user=broker_user(broker.url)) as client:
                token = await client.create("user_image_check", timeout=15)
            data = folder / "data"
            data.mkdir()
            (data / "users.csv").write_text("user_id\nuser_1\nuser_2\nuser_3\n", encoding="utf-8")
            os.chown(data, int(OPERATOR), int(OPERATOR))
            os.chown(data / "users.csv", int(OPERATOR), int(OPERATOR))
            # docs/operations.md: docker run --user "$(id -u):$(id -g)" -v "$PWD:/data" -w /data IMAGE bulk ...
            bulk = await arun(
                "podman", *RUNTIME, "run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false",
                "--user", f"{OPERATOR}:{OPERATOR}", "-v", f"{data}:/data", "-w", "/data",
                *options(AMQP_URL=broker.url, SERVICE_USER=broker_user(broker.url)), IMAGE,
                "bulk", "users.csv", "-o", "tokens.jsonl", "--reply-timeout", "30",
                "--no-progress", check=False,
            )  # fmt: skip
            rows = (data / "tokens.jsonl").read_text(encoding="utf-8").splitlines() if bulk.returncode == 0 else []
            # The mistakes an operator makes first: an output in the image's read-only /, and a key
            # file only root can read (a real key's mode is 0600): one line each, exit 2.
            at_root = await arun(
                "podman", *RUNTIME, "run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false",
                "-v", f"{data}:/data",
                *options(AMQP_URL=broker.url), IMAGE, "bulk", "/data/users.csv", "-o", "tokens.jsonl", check=False,
            )  # fmt: skip
            root_only = folder / "root-only-key"
            root_only.write_text(KEY, encoding="utf-8")
            root_only.chmod(0o600)
            unreadable = await arun(
                "podman", *RUNTIME, "run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false",
                "-v", f"{root_only}:/run/secrets/clerk:ro", *worker_env(broker, clerk, 0), IMAGE, check=False,
            )  # fmt: skip
            written = (data / "tokens.jsonl").stat() if rows else None
            mode = stat.S_IMODE(written.st_mode) if written else None
            stop_started = time.monotonic()
            await arun("podman", "stop", "-t", "30", started)
            stop_seconds = time.monotonic() - stop_started
            exit_code = await asyncio.to_thread(inspect, started, "{{.State.ExitCode}}", container=True)
        finally:
            await arun("podman", "rm", "-f", started, check=False)
            await clerk.stop()
    return {
        "user": user,
        "tmp_writable": tmp.returncode == 0,
        "healthcheck_exit": health,
        "token_user": token.user_id,
        "bulk_exit": bulk.returncode,
        "bulk_said": last_line(bulk.stderr),
        "bulk_rows": len(rows),
        "bulk_to_read_only_root": (at_root.returncode, last_line(at_root.stderr)),
        "key_file_unreadable": (unreadable.returncode, last_line(unreadable.stderr)),
        "bulk_output_mode": oct(mode) if mode is not None else None,
        "bulk_output_owner": str(written.st_uid) if written else None,
        "stop_seconds": round(stop_seconds, 2),
        "exit_code": int(exit_code),
    }


def main() -> None:
    """Build, run, report; exit 1 when the image does not do what the docs say."""
    missing = missing_tools()
    if missing:
        say(f"skipped: {', '.join(missing)} not installed (apt-get install podman mmdebstrap runc)")
        return
    cold = "--cold" in sys.argv[1:]
    conf_folder = tempfile.TemporaryDirectory()
    use_containers_conf(Path(conf_folder.name))
    if cold:
        say("--cold: removing the image and its stand-in bases first")
        run("podman", "rmi", "-f", IMAGE, BASE, f"ghcr.io/astral-sh/uv:{uv_pin()}", check=False)
    started = time.monotonic()
    make_bases()
    bases_seconds = time.monotonic() - started
    say("building the image from the Dockerfile (podman build --format docker)")
    build_seconds = build(cold=cold)
    size = int(inspect(IMAGE, "{{.Size}}"))
    config = {
        "user": inspect(IMAGE, "{{.Config.User}}"),
        "stop_signal": inspect(IMAGE, "{{.Config.StopSignal}}"),
        "healthcheck": inspect(IMAGE, "{{json .Config.Healthcheck}}").strip() not in ("", "null"),
    }
    say(f"built in {build_seconds:.1f} s, {size / 1e6:.0f} MB; running it")
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)  # noqa: PTH101, S103 - the containers' users reach the files below it
        found = asyncio.run(exercise(Path(folder)))
    figures = {
        "cold": cold,
        "bases_seconds": round(bases_seconds, 1),
        "build_seconds": round(build_seconds, 1),
        "image_bytes": size,
        **config,
        **found,
    }
    out = ROOT / "benchmarks" / "results" / f"image-check{'-cold' if cold else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for name, value in figures.items():
        say(f"{name}: {value}")
    expected = {
        "user": "10001",
        "tmp_writable": False,
        "healthcheck_exit": 0,
        "token_user": "user_image_check",
        "bulk_exit": 0,
        "bulk_rows": 3,
        "bulk_output_mode": "0o600",
        "bulk_output_owner": OPERATOR,
        "exit_code": 0,
    }
    wrong = {k: figures[k] for k, v in expected.items() if figures[k] != v}
    for mistake, line in (
        (
            "bulk_to_read_only_root",
            "/tokens.jsonl: cannot be written (Read-only file system) by this process (uid 10001)",
        ),
        (
            "key_file_unreadable",
            "CLERK_SECRET_KEY_FILE: cannot read /run/secrets/clerk: Permission denied (this process runs as uid 10001",
        ),
    ):
        code, said = figures[mistake]  # type: ignore[misc]
        if code != 2 or line not in said:
            wrong[mistake] = figures[mistake]
    if wrong or figures["stop_signal"] != "SIGTERM" or not figures["healthcheck"]:
        sys.exit(f"image-check: not as documented: {wrong}")
    say("the image builds, runs read-only as 10001, passes its health check, answers, runs bulk and stops cleanly")


if __name__ == "__main__":
    main()
