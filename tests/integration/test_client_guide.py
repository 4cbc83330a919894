"""The client guide's complete example runs as written, against a real broker and worker."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from sign_in_tokens_client.connection import broker_user

from service.local.fake_clerk import FakeClerk

GUIDE = Path(__file__).parents[2] / "docs" / "client.md"


def example() -> str:
    """The Python block under "A complete example"."""
    section = GUIDE.read_text(encoding="utf-8").split("## A complete example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


async def run_example(python: str, amqp_url: str, queue_names: dict[str, str], folder: Path, **env: str) -> str:
    """The guide's example run by ``python`` (from ``folder``) against the test's worker; what it printed.

    Checked as the guide says it prints: a token, five more, the same token on a retry, a 404.
    """
    script = folder / "example.py"
    script.write_text(example(), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        python,
        str(script),
        cwd=folder,
        env={
            "AMQP_URL": amqp_url,
            "REQUEST_QUEUE": queue_names["REQUEST_QUEUE"],
            "SERVICE_USER": broker_user(amqp_url),
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert re.fullmatch(r"token sit_\w+ for user_2x4Qm, status pending", lines[0])
    assert lines[1].startswith("5 tokens, ids [")
    assert lines[2:] == ["same token on retry: True", "user_not_found: Clerk said 404 (trace True)"]
    return stdout.decode()


async def test_the_guides_example_runs_and_prints_what_the_guide_says(
    worker: object, amqp_url: str, queue_names: dict[str, str], tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    printed = await run_example(sys.executable, amqp_url, queue_names, tmp_path, PYTHONPATH=str(GUIDE.parents[1]))
    # The example never prints a token or its URL.
    assert not any(token["token"] in printed for token in fake_clerk.stats.tokens.values())
