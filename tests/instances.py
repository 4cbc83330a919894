"""Two Clerk instances at the stand-in Clerk, prod and staging, as the instances tests set them up."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from tests.workers import Replies, count_replies

PROD_KEY: Final = "sk_test_" + "p" * 32
STAGING_KEY: Final = "sk_test_" + "s" * 32
KEYS: Final = {"prod": PROD_KEY, "staging": STAGING_KEY}
PROD: Final[dict[str, Any]] = {"x-clerk-instance": "prod"}
STAGING: Final[dict[str, Any]] = {"x-clerk-instance": "staging"}


def instances_file(path: Path, fake_clerk: FakeClerk, **tables: str | None) -> str:
    """Write a CLERK_INSTANCES_FILE at ``path``: each instance of ``tables`` (name: more lines of its table).

    An instance's key is KEYS's (``secret_key``), unless its lines name a ``secret_key_file``. The
    stand-in Clerk is told nothing: a test accepts the keys it means to.
    """
    text = ""
    for name, lines in tables.items():
        if lines is None:
            continue
        secret = "" if "secret_key_file" in lines else f'secret_key = "{KEYS[name]}"\n'
        text += f'[instances.{name}]\n{secret}api_url = "{fake_clerk.url}"\n{lines}'
    path.write_text(text)
    return str(path)


def limited(calls: int) -> str:
    """An instance's table lines: ``calls`` a second."""
    return f"rate_limit = {calls}\nrate_window_seconds = 1\n"


async def replies_to(channel: AbstractChannel, queue_names: dict[str, str], name: str) -> Replies:
    """A durable reply queue of this test's, named after ``name``, and what reaches it."""
    counted, _ = await count_replies(channel, f"{queue_names['REQUEST_QUEUE']}.{name}")
    return counted
