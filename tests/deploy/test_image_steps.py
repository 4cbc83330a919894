"""The Dockerfile's build stage, performed here step by step, and its HEALTHCHECK run against its entry point.

No container engine is needed: each COPY, ENV, WORKDIR and RUN of the build stage is done in a
fresh directory (its absolute paths mapped into it), which yields the image's virtual environment;
then the runtime stage's ENTRYPOINT and CMD start from it, and its HEALTHCHECK command must pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import free_port
from tests.conftest import SECRET_KEY

ROOT = Path(__file__).parents[2]


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (instruction, arguments), continuation lines joined."""
    joined = text.replace("\\\n", " ")
    found: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, arguments = stripped.partition(" ")
        if instruction.upper() == "FROM":
            found.append([])
        found[-1].append((instruction.upper(), arguments.strip()))
    return found


def env_pairs(arguments: str) -> dict[str, str]:
    """ENV's KEY=value pairs (values may be quoted)."""
    return dict(part.split("=", 1) for part in shlex.split(arguments))


class Mapping:
    """The image's absolute paths, mapped into a directory here."""

    def __init__(self, base: Path) -> None:
        self.paths = {"/opt/venv": str(base / "venv"), "/src": str(base / "src")}

    def __call__(self, text: str) -> str:
        for image_path, here in self.paths.items():
            text = text.replace(image_path, here)
        return text


def perform(build: list[tuple[str, str]], mapped: Mapping, base: Path) -> list[str]:
    """Do the build stage's COPY, ENV, WORKDIR and RUN here; return the commands run."""
    env = {**os.environ, "PATH": f"{Path.home() / '.local/bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    cwd = base
    ran = []
    for instruction, arguments in build:
        if instruction == "ENV":
            env.update({k: mapped(v) for k, v in env_pairs(arguments).items()})
        elif instruction == "WORKDIR":
            cwd = Path(mapped(arguments))
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY" and not arguments.startswith("--from"):
            *sources, target = arguments.split()
            for source in sources:
                copy(ROOT / source, cwd / target / Path(source).name if target.endswith("/") else cwd / target)
        elif instruction == "RUN":
            ran.append(mapped(arguments))
            subprocess.run(["bash", "-c", ran[-1]], cwd=cwd, env=env, check=True, timeout=600)  # noqa: S603, S607
    return ran


def copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)  # as COPY makes the folders it writes into
    if source.is_dir():
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(source, destination)


async def test_the_build_stage_performed_here_gives_an_entry_point_that_passes_the_healthcheck(
    tmp_path: Path, fake_clerk: FakeClerk, amqp_url: str, queue_names: dict[str, str]
) -> None:
    if shutil.which("uv") is None and not (Path.home() / ".local/bin/uv").exists():
        pytest.skip("uv is not installed (scripts/setup installs it)")
    build, runtime = stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    mapped = Mapping(tmp_path)
    ran = await asyncio.to_thread(perform, build, mapped, tmp_path)
    assert any("uv sync --frozen --no-dev" in command for command in ran)
    venv_bin = tmp_path / "venv" / "bin"
    # The runtime stage: its ENV, its entry point and command, its health check, its stop signal.
    settings = dict(runtime)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    for instruction, arguments in runtime:
        if instruction == "ENV":
            env.update({k: mapped(v).replace("$PATH", os.environ["PATH"]) for k, v in env_pairs(arguments).items()})
    assert env["PATH"].startswith(str(venv_bin))
    assert settings["STOPSIGNAL"] == "SIGTERM"
    entrypoint = json.loads(settings["ENTRYPOINT"]) + json.loads(settings["CMD"])
    probe = json.loads(settings["HEALTHCHECK"].split(" CMD ", 1)[1])
    env.update(AMQP_URL=amqp_url, CLERK_API_URL=fake_clerk.url, CLERK_SECRET_KEY=SECRET_KEY, HTTP_PORT=str(free_port()))
    env.update(queue_names)
    worker = await asyncio.create_subprocess_exec(str(venv_bin / entrypoint[0]), *entrypoint[1:], env=env)
    try:
        for _ in range(300):
            checked = await asyncio.create_subprocess_exec(str(venv_bin / probe[0]), *probe[1:], env=env)
            if await checked.wait() == 0:
                break
            assert worker.returncode is None, "the entry point exited"
            await asyncio.sleep(0.1)  # wait-ok: the poll interval of a condition wait
        assert checked.returncode == 0, "the HEALTHCHECK command did not pass within 30 s"
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()


def test_every_file_the_build_stage_copies_is_in_the_build_context() -> None:
    """.dockerignore leaves out everything but what it names again: each COPY source must be named."""
    kept = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    ]
    build, _ = stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    copied = [
        source
        for instruction, arguments in build
        if instruction == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert any(source.rstrip("/") == k or source.startswith(f"{k}/") for k in kept), source
