"""The fault suite: figures recorded by each fault, printed as a table at the end of the run.

``pytest tests/faults`` runs the short mode (CI); ``pytest tests/faults --long`` the bigger
numbers. With FAULT_FIGURES=path the figures are also written there as JSON lines.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from service.local.fake_clerk import FakeClerk
from tests import ledger

FIGURES: list[dict[str, Any]] = []


class Figures:
    """Where a fault test records what it measured."""

    def __init__(self, *, long: bool) -> None:
        self.long = long

    def scale(self, short: int, long: int) -> int:
        """The short-mode or long-mode number."""
        return long if self.long else short

    def record(self, fault: str, **figures: Any) -> None:
        """Keep one fault's figures for the summary table."""
        row = {"fault": fault, "mode": "long" if self.long else "short", **figures}
        FIGURES.append(row)
        path = os.environ.get("FAULT_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as out:  # noqa: PTH123
                out.write(json.dumps(row) + "\n")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """The recorder, in the mode the command line chose."""
    return Figures(long=bool(request.config.getoption("--long")))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item) -> Any:
    """Keep each phase's report on the test, so a fixture can tell whether the test passed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def ledger_checked(fake_clerk: FakeClerk, request: pytest.FixtureRequest) -> Any:
    """Every fault test that passes has ended by checking the token ledger (``await token_ledger.balanced()``)."""
    yield
    call = getattr(request.node, "report_call", None)
    book = ledger.current()
    if call is not None and call.passed:
        assert book is not None
        assert book.checked, "a fault test must end with: await token_ledger.balanced()"
        Figures(long=bool(request.config.getoption("--long"))).record(f"ledger of {request.node.name}", **book.last)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print every fault's figures."""
    if not FIGURES:
        return
    terminalreporter.section("fault figures")
    for row in FIGURES:
        terminalreporter.write_line("  ".join(f"{k}={v}" for k, v in row.items()))
