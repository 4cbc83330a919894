"""docs/asyncapi.yaml is the one generated from the code."""

from __future__ import annotations

from pathlib import Path

from service.asyncapi import render


def test_committed_asyncapi_matches_the_message_types() -> None:
    """Regenerate with `uv run python -m service.asyncapi > docs/asyncapi.yaml` when this fails."""
    committed = (Path(__file__).parents[2] / "docs" / "asyncapi.yaml").read_text()
    assert committed == render()
