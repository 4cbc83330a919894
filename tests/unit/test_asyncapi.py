"""docs/asyncapi.yaml is the one generated from the code, a valid AsyncAPI 3.0 document saying what a caller needs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from service.local.asyncapi import DEAD_LETTER_REASONS, ERROR_CODES, document, render

DOC = Path(__file__).parents[2] / "docs" / "asyncapi.yaml"
NODE_DIR = Path(__file__).parents[1] / "interop" / "node"


def test_committed_asyncapi_matches_the_message_types() -> None:
    """Regenerate with `uv run python -m service.local.asyncapi > docs/asyncapi.yaml` when this fails."""
    assert DOC.read_text() == render()


def test_the_official_parser_finds_no_error() -> None:
    """@asyncapi/parser (npm, installed by scripts/setup when node is present) validates the committed file."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AsyncAPI parser is a Node.js package")
    if not (NODE_DIR / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.skip(f"@asyncapi/parser is not installed in {NODE_DIR}: run scripts/setup (npm ci) with node present")
    result = subprocess.run(  # noqa: S603 - our script, a fixed path
        [node, str(NODE_DIR / "validate-asyncapi.mjs"), str(DOC)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    diagnostics = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d for d in diagnostics if d["severity"] == 0] == [], result.stderr
    assert result.returncode == 0


def test_it_says_what_a_caller_needs() -> None:
    """Both spellings, both content types, the properties read, seven codes, the queues, the audit exchange."""
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    schemas = doc["components"]["schemas"]
    assert schemas["SignInTokenRequest"]["oneOf"] == [{"required": ["user_id"]}, {"required": ["userId"]}]
    assert schemas["ErrorDetail"]["properties"]["code"]["enum"] == list(ERROR_CODES)
    messages = doc["components"]["messages"]
    assert {m["contentType"] for k, m in messages.items() if k.startswith("CreateRequest")} == {
        "application/json",
        "application/msgpack",
    }
    request = messages["CreateRequestJson"]
    assert set(request["x-amqp-properties"]["properties"]) >= {"reply_to", "correlation_id", "message_id", "user_id"}
    assert "x-deadline" in request["headers"]["properties"]
    dead = messages["DeadLetter"]["headers"]["properties"]
    assert dead["x-dead-letter-reason"]["enum"] == list(DEAD_LETTER_REASONS)
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses >= {
        "sign_in_tokens.create",
        "sign_in_tokens.create.bulk",
        "sign_in_tokens.revoke",
        "sign_in_tokens.results",
        "sign_in_tokens.dead",
        "sign_in_tokens.audit",
    }
    assert doc["channels"]["audit"]["bindings"]["amqp"]["exchange"]["type"] == "topic"
