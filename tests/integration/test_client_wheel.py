"""The client library alone: its wheel, in an environment with nothing but its dependencies, runs the guide's example."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_client_guide import run_example

ROOT = Path(__file__).parents[2]
CLIENT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sign-in-tokens" / "client-venv"
# The client's dependencies, and theirs: nothing of the service (no Redis, OpenTelemetry, Prometheus...).
ALONE = {"aio-pika", "aiormq", "idna", "msgspec", "multidict", "pamqp", "propcache", "yarl", "sign-in-tokens-client"}


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]  # noqa: S603
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the client-only environment, with the client's wheel built now installed in it."""
    uv = shutil.which("uv")
    if uv is None or not (CLIENT_VENV / "bin" / "python").exists():
        pytest.skip("the client-only environment is made by scripts/setup --tests (with uv)")
    where = tmp_path_factory.mktemp("client-wheel")
    run(
        uv, "build", "--offline", "--quiet", "--package", "sign-in-tokens-client", "--wheel", "-o", str(where), cwd=ROOT
    )
    (wheel,) = where.glob("sign_in_tokens_client-*.whl")
    venv = where / "venv"
    shutil.copytree(CLIENT_VENV, venv, symlinks=True)
    python = venv / "bin" / "python"
    run(uv, "pip", "install", "--offline", "--quiet", "--no-deps", "--python", str(python), str(wheel))
    listed = run(uv, "pip", "list", "--python", str(python), "--format", "freeze").stdout
    assert {line.split("==")[0] for line in listed.split()} == ALONE
    return python


def test_the_wheel_imports_without_the_service(client_python: Path, tmp_path: Path) -> None:
    done = subprocess.run(  # noqa: S603 - the environment's own python
        [str(client_python), "-c", "import sign_in_tokens_client, sys; import service"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "No module named 'service'" in done.stderr, done.stderr


async def test_the_guides_example_runs_on_the_wheel_alone(
    client_python: Path, worker: object, amqp_url: str, queue_names: dict[str, str], tmp_path: Path
) -> None:
    await run_example(str(client_python), amqp_url, queue_names, tmp_path)
