"""Every shell and Python example of README.md and docs/ runs as written, or says why it cannot here.

An example is a fenced ``sh`` or ``python`` block. Unmarked, it is run: a Python block as a file
of its own (against a worker serving the default queues, with the fake Clerk), a shell block with
bash from the repository's root (against the session's broker, through ``AMQP_URL``), each to
exit 0, printing no token, and leaving the repository's tree as it was. An HTML comment on the
line before a block says otherwise, with its reason:

- ``<!-- example: not run: REASON -->`` (a production host, a cluster, this suite itself);
- ``<!-- example: fragment -->``: Python lines out of a larger example; compiled (top-level
  ``await`` allowed), not run;
- ``<!-- example: run by tests/PATH -->``: a test of its own runs it and checks its output.

A ``toml`` block is a policy file, or (its tables ``[instances.NAME]``) a CLERK_INSTANCES_FILE: it
must load as one (the key files it names replaced by files holding a key).
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from sign_in_tokens_client.connection import broker_user

from service.clerk.instances import load_instances
from service.config import Settings
from service.local.fake_clerk import FakeClerk
from service.trust.policy import load_policy
from tests.conftest import WorkerFactory

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- example: (.+?) -->")
RUN_SECONDS = 240


@dataclass(frozen=True)
class Example:
    """One fenced block of a page, and what the line before it says about running it."""

    page: Path
    line: int
    language: str
    code: str
    marker: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(*languages: str) -> list[Example]:
    """Every fenced block in ``languages`` of README.md and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) not in languages:
                continue
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            marker = MARKER.fullmatch(before.strip())
            line = text.count("\n", 0, match.start()) + 1
            found.append(Example(page, line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return found


def to_run(language: str) -> list[Example]:
    return [e for e in examples(language) if e.marker is None]


def tree() -> str:
    """What git sees in the working tree, untracked and ignored files included."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored"],  # noqa: S607 - git from PATH
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_every_example_runs_here_or_says_why_not() -> None:
    shown = examples("sh", "bash", "python")
    assert len(shown) > 10
    for example in shown:
        marker = example.marker
        if marker is None:
            continue
        if marker.startswith("not run: "):
            assert len(marker) > len("not run: ") + 10, f"{example.name}: say why it is not run"
        elif marker == "fragment":
            assert example.language == "python", example.name
            compile(example.code, example.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        elif marker.startswith("run by "):
            test_file = ROOT / marker.removeprefix("run by ")
            assert test_file.is_file(), example.name
            assert example.page.name in test_file.read_text(encoding="utf-8"), (
                f"{test_file} does not read {example.page}"
            )
        else:
            pytest.fail(f"{example.name}: unknown marker {marker!r}")
    assert [e for e in shown if e.marker is None], "no example is run at all"


def _instances(example: Example) -> bool:
    return example.code.lstrip().startswith("[instances.")


@pytest.mark.parametrize("example", [e for e in examples("toml") if not _instances(e)], ids=lambda e: e.name)
def test_the_policy_examples_load(example: Example, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(example.code, encoding="utf-8")
    assert load_policy(str(policy_file)).callers


@pytest.mark.parametrize("example", [e for e in examples("toml") if _instances(e)], ids=lambda e: e.name)
def test_the_instances_examples_load(example: Example, tmp_path: Path) -> None:
    code = example.code
    for n, path in enumerate(re.findall(r'secret_key_file = "([^"]+)"', code)):
        key_file = tmp_path / f"key-{n}"
        key_file.write_text(f"sk_test_{n}" + "k" * 32)
        code = code.replace(f'"{path}"', f'"{key_file}"')
    instances_file = tmp_path / "instances.toml"
    instances_file.write_text(code, encoding="utf-8")
    found = load_instances(Settings(), str(instances_file))
    assert len(found) >= 2


@pytest.mark.parametrize("example", to_run("python"), ids=lambda e: e.name)
async def test_the_python_examples_run_as_written(
    example: Example,
    start_worker: WorkerFactory,
    amqp_url: str,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    defaults = Settings()
    await start_worker(**{name: getattr(defaults, name.lower()) for name in queue_names})
    script = tmp_path / "example.py"
    script.write_text(example.code, encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env={"AMQP_URL": amqp_url, "SERVICE_USER": broker_user(amqp_url), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert stdout.strip(), "the example printed nothing"
    made = fake_clerk.stats.tokens.values()
    assert made, "the example asked for no token"
    assert not any(t["token"] in stdout.decode() or t["url"] in stdout.decode() for t in made)


@pytest.mark.parametrize("example", to_run("sh"), ids=lambda e: e.name)
async def test_the_shell_examples_run_as_written(example: Example, amqp_url: str) -> None:
    before = tree()
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        example.code,
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_SECONDS)
    assert process.returncode == 0, (stdout + stderr).decode()[-3000:]
    assert tree() == before, "the example left files in the repository"
