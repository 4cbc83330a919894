"""Who may ask for a token.

The publisher is the AMQP ``user_id`` property, which RabbitMQ validates
against the connection's user. With ``ALLOWED_PUBLISHERS`` set, only those
publishers are served; a request from anyone else (or with no ``user_id``)
is answered ``forbidden`` without calling Clerk. Empty means anyone who can
publish to the queue may ask (the broker's permissions are then the policy).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from service.errors import ConfigError, ForbiddenError
from service.messages import CreateSignInTokenRequestBody


class Policy:
    """The authorisation check between decoding and the upstream call."""

    def __init__(self, allowed_publishers: frozenset[str]) -> None:
        """Allow these publishers; an empty set allows every publisher."""
        self._allowed = allowed_publishers

    def check(self, publisher: str | None, request: CreateSignInTokenRequestBody) -> None:
        """Raise ForbiddenError when ``publisher`` may not ask for ``request``."""
        del request  # per-user and per-organization rules will look at it
        if self._allowed and publisher not in self._allowed:
            who = repr(publisher) if publisher else "a publisher without a user_id property"
            msg = f"{who} may not request sign-in tokens"
            raise ForbiddenError(msg)


# -- the policy file (POLICY_FILE, contract v2) -------------------------------------------------
#
# Decoded and checked here; the worker does not apply it yet.

LaneName = Literal["interactive", "bulk"]
Pattern = Annotated[str, Meta(min_length=1, max_length=255)]
_PATH_IN_ERROR: Final = re.compile(r" - at `\$\.?(.*)`$")


class CallerRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What one caller (or ``[defaults]``) may ask for; what is not said is not allowed."""

    lanes: frozenset[LaneName]
    max_expires_in_seconds: Annotated[int, Meta(ge=1, le=315_360_000)]
    allow_org_id: bool = False
    # Queue names, or globs (``support.replies.*``), a reply may go to.
    reply_to: tuple[Pattern, ...]


class PolicyFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The whole file: protected users, the rules for callers not listed, and each caller's."""

    protected_users: tuple[Pattern, ...] = ()
    defaults: CallerRules | None = None
    callers: dict[Annotated[str, Meta(min_length=1, max_length=255)], CallerRules] = msgspec.field(default_factory=dict)

    def rules_for(self, caller: str | None) -> CallerRules | None:
        """The rules for ``caller`` (a validated ``user_id``), ``[defaults]`` for others, None: refused."""
        if caller:
            rules = self.callers.get(caller)
            if rules is not None:
                return rules
        return self.defaults


def load_policy(path: str) -> PolicyFile:
    """Read and check the policy file; ConfigError names the file and the place in it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"POLICY_FILE: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    except UnicodeDecodeError:
        msg = f"POLICY_FILE: {path} is not UTF-8 text"
        raise ConfigError(msg) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"POLICY_FILE: {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    callers = raw.pop("callers", {})
    if not isinstance(callers, dict):
        msg = f"POLICY_FILE: {path} at callers: Expected a table of callers, got {type(callers).__name__}"
        raise ConfigError(msg)
    policy = _convert(raw, PolicyFile, path, "")
    # One caller at a time, so that an error names the caller (msgspec names a mapping's keys "[...]").
    rules = {name: _convert(table, CallerRules, path, f"callers.{name}") for name, table in callers.items()}
    if any(not name or len(name) > 255 for name in rules):
        msg = f"POLICY_FILE: {path} at callers: a caller's name must be 1 to 255 characters"
        raise ConfigError(msg)
    return msgspec.structs.replace(policy, callers=rules)


T = TypeVar("T")


def _convert(raw: object, type_: type[T], path: str, where: str) -> T:
    """``raw`` as ``type_``; ConfigError naming the file and the place (``where``, then msgspec's path)."""
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_IN_ERROR.search(message)
        inner = match.group(1) if match else ""
        place = ".".join(part for part in (where, inner) if part).replace(".[", "[")
        reason = message[: match.start()] if match else message
        msg = f"POLICY_FILE: {path}{f' at {place}' if place else ''}: {reason}"
        raise ConfigError(msg) from None
