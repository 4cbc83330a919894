"""The token ledger: every token the stand-in Clerk made has exactly one fate.

Each token made (a sign-in token or an actor token) is either delivered to exactly one caller (and left live) or
revoked (and delivered to nobody). The one cost allowed beyond that is a
create cut after it was sent (a SIGKILL mid-call, or a timeout after the
request left), which a test counts and bounds with ``cut``. Every reply to
one ``message_id`` carries the same token.

``Replies`` (tests.workers) reports each ``created`` reply here; a test that
receives tokens another way (the client library) reports them with
``delivered``. Fault and fleet tests end with ``await ledger.balanced()``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from service.local.fake_clerk import FakeClerk

_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class LedgerFigures:
    """What the ledger found."""

    made: int
    delivered: int
    revoked: int
    orphans: int
    revoked_but_delivered: int
    delivered_twice: int
    message_ids_with_two_tokens: int

    def as_dict(self) -> dict[str, int]:
        """The figures, for a fault's summary line."""
        return dict(self.__dict__)


@dataclass
class Ledger:
    """Who received each token the stand-in Clerk made."""

    clerk: FakeClerk
    receivers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tokens_by_message: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    checked: bool = False
    # What the last check found, and what it allowed.
    last: dict[str, int] = field(default_factory=dict)

    def delivered(self, token_id: str, caller: str, message_id: str | None = None) -> None:
        """``caller`` received ``token_id`` (in a reply to ``message_id``)."""
        self.receivers[token_id].add(caller)
        if message_id:
            self.tokens_by_message[caller, message_id].add(token_id)

    def made(self) -> dict[str, dict[str, object]]:
        """Every token the stand-in Clerk made, of both kinds (sign-in and actor tokens), by id."""
        return {**self.clerk.stats.tokens, **self.clerk.actors.tokens}

    def revoked(self) -> set[str]:
        """Every token the stand-in Clerk revoked, of both kinds."""
        return self.clerk.stats.revoked | self.clerk.actors.revoked

    def figures(self) -> LedgerFigures:
        """The ledger as it stands now."""
        made = set(self.made())
        revoked = self.revoked()
        delivered = {token for token, callers in self.receivers.items() if callers}
        return LedgerFigures(
            made=len(made),
            delivered=len(delivered),
            revoked=len(revoked),
            orphans=len(made - delivered - revoked),
            revoked_but_delivered=len(revoked & delivered),
            delivered_twice=sum(1 for callers in self.receivers.values() if len(callers) > 1),
            message_ids_with_two_tokens=sum(1 for tokens in self.tokens_by_message.values() if len(tokens) > 1),
        )

    def _settled(self, cut: int) -> bool:
        figures = self.figures()
        return figures.orphans <= cut

    async def balanced(self, *, cut: int = 0, reissued: int = 0, timeout: float = 30.0) -> LedgerFigures:  # noqa: ASYNC109
        """Wait (up to ``timeout``) for every token to reach its fate, then assert the ledger balances.

        ``cut``: creates a test cut on purpose after they were sent (SIGKILL), left live unheld.
        ``reissued``: without a shared store, requests answered but not yet acknowledged when
        their replica was SIGKILLed, answered again with a new token by the next (documented).
        """
        self.checked = True
        for _ in range(int(timeout / _POLL_SECONDS)):
            if self._settled(cut):
                break
            await asyncio.sleep(_POLL_SECONDS)  # wait-ok: the poll interval of a condition wait
        figures = self.figures()
        problems = []
        if figures.revoked_but_delivered:
            problems.append(f"{figures.revoked_but_delivered} token(s) revoked after a caller received them")
        if figures.delivered_twice:
            problems.append(f"{figures.delivered_twice} token(s) delivered to more than one caller")
        if figures.message_ids_with_two_tokens > reissued:
            problems.append(f"{figures.message_ids_with_two_tokens} message_id(s) answered with different tokens")
        if figures.orphans > cut:
            made = self.made()
            orphans = sorted(set(made) - set(self.receivers) - self.revoked())
            users = ", ".join(f"{made[t]['user_id']} ({t})" for t in orphans[:5])
            problems.append(f"{figures.orphans} live token(s) nobody holds (allowed: {cut}): {users}")
        self.last = {**figures.as_dict(), "cut_allowed": cut}
        if problems:
            pytest.fail(f"the token ledger does not balance: {'; '.join(problems)} ({figures.as_dict()})")
        return figures


CURRENT: list[Ledger] = []


def current() -> Ledger | None:
    """The ledger of the test running now, if it keeps one."""
    return CURRENT[-1] if CURRENT else None
