"""Who may ask for a token, for whom, for how long, and where it may go.

The caller is the AMQP ``user_id`` property, which RabbitMQ validates
against the connection's user, so it cannot be forged. The rules come from
one of three sources (``Policy.from_settings``):

- ``POLICY_FILE`` (TOML, contracts v2 and v3): per caller, its lanes, the
  longest ``expires_in_seconds`` (a request without one gets that maximum,
  not Clerk's 30 days), whether it may set ``org_id``, and the queues a reply
  may go to; ``protected_users`` never get a token; identified callers not
  listed get ``[defaults]``, requests without a ``user_id`` property
  ``[anonymous]``; a caller with neither has no rules. A listed caller with
  ``lanes = []`` is refused everything (how a caller is cut off while
  ``[defaults]`` exists). Impersonation (contract v3, actor tokens): whom a
  caller may impersonate (``impersonate``), as which actor (``actors``, with
  ``actor_keys`` beside ``sub``), for how long (``max_impersonation_seconds``,
  ``max_session_seconds``: a request without them gets these maxima, not
  Clerk's defaults); absent, none; never under ``[anonymous]``. Sealed replies (contract v3):
  the public key a caller's tokens are sealed to (``reply_public_key``, two while it rolls), and
  ``require_sealed`` (a caller without one then has no rules);
- ``ALLOWED_PUBLISHERS``, the short form: the callers listed may ask for
  anything, anyone else has no rules (the two cannot be set together);
- neither: anyone who can publish to the queues is served (the broker's
  permissions are then the policy), and the worker warns at start.

A caller with no rules gets nothing at all (``knows`` is false: the worker
dead-letters its request, ``forbidden_caller``). A caller with rules is
refused by ``ForbiddenError``, whose message names the rule it broke and
says nothing of other callers' rules.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta
from sign_in_tokens_client.connection import (
    DEFAULT_INSTANCE,
    DIRECT_REPLY_TO,
    INSTANCE_HEADER,
    INSTANCE_NAME,
    REPLY_KEY_HEADER,
)
from sign_in_tokens_client.contract.errors import ConfigError, ForbiddenError, InvalidRequestError
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import CLERK_ACTOR_KEYS, ActorKey, CreateActorTokenRequestBody
from sign_in_tokens_client.contract.messages import CreateSignInTokenRequestBody as Request
from sign_in_tokens_client.sealing import SealingError, read_key, read_public_key

from service.config import Settings
from service.tomlfiles import at, convert, named_tables, read_table

# The queues a caller may use: the two lanes of sign-in tokens, and impersonation. Impersonation is
# served at the interactive lane: a caller with "interactive" or "impersonate" impersonates whom its
# ``impersonate`` key names; "impersonate" alone gives impersonation and no sign-in token.
LaneName = Literal["interactive", "bulk", "impersonate"]
Pattern = Annotated[str, Meta(min_length=1, max_length=255)]
_VARIABLE: Final = "POLICY_FILE"
# What a caller writes for direct reply-to; the broker hands the worker ``amq.rabbitmq.reply-to.<suffix>``
# (an entry for it matches that, and nothing else that merely starts the same).
DIRECT_REPLY_TO_NAME: Final = DIRECT_REPLY_TO + "."
_ALL_LANES: Final[frozenset[LaneName]] = frozenset({"interactive", "bulk"})
# Impersonation is served at the interactive lane: a caller of either lane below may be allowed it.
_IMPERSONATION_LANES: Final[frozenset[LaneName]] = frozenset({"interactive", "impersonate"})
# The keys of impersonation: never in ``[anonymous]`` (a caller without a name never impersonates).
_IMPERSONATION_KEYS: Final = ("impersonate", "actors", "actor_keys", "max_impersonation_seconds", "max_session_seconds")
_NO_RULES: Final = "callers: {who} has no rules in the policy"
Seconds = Annotated[int, Meta(ge=1, le=315_360_000)]
ReplyKey = Annotated[str, Meta(max_length=64)]


class CallerRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What one caller (or ``[defaults]``) may ask for; what is not said is not allowed."""

    lanes: frozenset[LaneName]
    max_expires_in_seconds: Annotated[int, Meta(ge=1, le=315_360_000)]
    allow_org_id: bool = False
    # Queue names, or globs (``support.replies.*``), a reply may go to.
    reply_to: tuple[Pattern, ...]
    # Impersonation (actor tokens): globs of the users it may impersonate, and of the actors
    # (``actor.sub``) it may name; the actor's keys it may set beside ``sub``; both lifetimes' caps.
    impersonate: tuple[Pattern, ...] = ()
    actors: tuple[Pattern, ...] = ()
    actor_keys: tuple[ActorKey, ...] = ()
    max_impersonation_seconds: Seconds = 600
    max_session_seconds: Seconds = 1_800
    # The Clerk instances it may use (names or globs; absent: only the one its requests fall back to),
    # and the one a request without the header x-clerk-instance goes to (absent: ``default``).
    instances: tuple[Pattern, ...] | None = None
    default_instance: Annotated[str, Meta(pattern=INSTANCE_NAME)] | None = None
    # Sealed replies (contract v3): the caller's public key (base64) its tokens are sealed to; two
    # while its key rolls (a request names the one it holds in x-reply-public-key; absent, the first).
    reply_public_key: ReplyKey | Annotated[tuple[ReplyKey, ...], Meta(min_length=1, max_length=4)] | None = None

    @property
    def reply_public_keys(self) -> tuple[str, ...]:
        """Its reply keys as written, one or several (none: plain replies)."""
        key = self.reply_public_key
        return (key,) if isinstance(key, str) else key or ()


class PolicyFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The whole file: protected users, the rules for callers not listed and for nameless ones, and each caller's."""

    protected_users: tuple[Pattern, ...] = ()
    # Sealed replies only: a caller without ``reply_public_key`` gets nothing (forbidden_caller).
    require_sealed: bool = False
    defaults: CallerRules | None = None
    anonymous: CallerRules | None = None
    callers: dict[Annotated[str, Meta(min_length=1, max_length=255)], CallerRules] = msgspec.field(default_factory=dict)

    def rules_for(self, caller: str | None) -> CallerRules | None:
        """The rules for ``caller`` (a validated ``user_id``): its own, ``[defaults]``, ``[anonymous]``; None: none."""
        return _for_caller(self.callers, self.defaults, self.anonymous, caller)


R = TypeVar("R")


def _for_caller(callers: Mapping[str, R], defaults: R | None, anonymous: R | None, caller: str | None) -> R | None:
    """A listed caller's own rules; an identified caller not listed gets ``defaults``; a nameless one ``anonymous``."""
    return callers.get(caller, defaults) if caller else anonymous


def _exceeds(wider: CallerRules, rules: CallerRules) -> bool:
    """Whether ``wider`` allows anything ``rules`` does not (a lane, a lifetime, org_id, a reply queue, an instance)."""
    return (
        not wider.lanes <= rules.lanes
        or wider.max_expires_in_seconds > rules.max_expires_in_seconds
        or (wider.allow_org_id and not rules.allow_org_id)
        or not set(wider.reply_to) <= set(rules.reply_to)
        or not set(_instances_written(wider)) <= set(_instances_written(rules))
    )


def _instances_written(rules: CallerRules) -> tuple[str, ...]:
    """The instances a table allows, as written: its ``instances``, else the one it falls back to."""
    return rules.instances if rules.instances is not None else (rules.default_instance or DEFAULT_INSTANCE,)


def _matcher(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression for a list of globs (case-sensitive, as queue and user ids are); None for none."""
    translated = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{t})" for t in translated)) if translated else None


class _Compiled:
    """One caller's rules with its globs compiled once."""

    __slots__ = ("actors", "fallback", "impersonate", "instances", "name", "reply_keys", "reply_to", "rules")

    def __init__(self, rules: CallerRules, name: str) -> None:
        self.rules = rules
        self.name = name
        self.reply_keys = tuple(read_public_key(key) for key in rules.reply_public_keys)
        self.reply_to = _matcher(rules.reply_to)
        self.impersonate = _matcher(rules.impersonate)
        self.actors = _matcher(rules.actors)
        self.fallback = rules.default_instance or DEFAULT_INSTANCE
        self.instances = _matcher(rules.instances or ())

    def may_use(self, instance: str) -> bool:
        """Whether it may use ``instance``: one its ``instances`` name (``[]``: none), absent only its fallback."""
        if self.rules.instances is None:
            return instance == self.fallback
        return self.instances is not None and self.instances.fullmatch(instance) is not None

    def reply_allowed(self, queue: str) -> bool:
        if self.reply_to is None:
            return False
        if queue.startswith(DIRECT_REPLY_TO_NAME) and self.reply_to.fullmatch(DIRECT_REPLY_TO):
            return True
        return self.reply_to.fullmatch(queue) is not None


class Policy:
    """The rules in force, checked between decoding and the upstream call."""

    def __init__(self, file: PolicyFile | None, *, fill_expiry: bool = True) -> None:
        """Apply ``file``; None serves everyone.

        ``fill_expiry``: a request without ``expires_in_seconds`` gets its caller's maximum.
        """
        self.file = file
        self._fill_expiry = fill_expiry
        self._protected = _matcher(file.protected_users) if file else None
        callers = file.callers if file else {}
        self._callers = {name: _Compiled(rules, f"caller {name!r}") for name, rules in callers.items()}
        self._defaults = _Compiled(file.defaults, "[defaults]") if file and file.defaults else None
        self._anonymous = _Compiled(file.anonymous, "[anonymous]") if file and file.anonymous else None

    @property
    def open(self) -> bool:
        """Whether everyone who can publish is served (no policy)."""
        return self.file is None

    @property
    def sealed_tables(self) -> int:
        """How many tables of rules seal their callers' replies (``[defaults]`` and ``[anonymous]`` included)."""
        return sum(1 for _, table in _tables(self.file) if table.reply_public_key is not None) if self.file else 0

    @property
    def refuses_nameless(self) -> bool:
        """Whether a policy serves identified callers it does not list but no nameless one (worth a warning)."""
        return self.file is not None and self.file.defaults is not None and self.file.anonymous is None

    def wider_when_nameless(self) -> list[str]:
        """Listed callers whose rules ``[anonymous]`` exceeds: each could get more by leaving out ``user_id``.

        RabbitMQ names no publisher on a message without ``user_id``, so a listed caller that leaves
        it out is served by ``[anonymous]``: cutting one off (``lanes = []``) or narrowing it holds
        only as far as ``[anonymous]`` is narrower still, or the caller cannot publish at all.
        """
        anonymous = self.file.anonymous if self.file else None
        if anonymous is None or self.file is None:
            return []
        return sorted(name for name, rules in self.file.callers.items() if _exceeds(anonymous, rules))

    @classmethod
    def from_publishers(cls, publishers: frozenset[str], max_expires_in_seconds: int) -> Policy:
        """The short form: these callers may ask for anything, anyone else has no rules; empty: no policy."""
        if not publishers:
            return cls(None)
        anything = CallerRules(
            lanes=_ALL_LANES,
            max_expires_in_seconds=max_expires_in_seconds,
            allow_org_id=True,
            reply_to=("*",),
            instances=("*",),
        )
        return cls(PolicyFile(callers=dict.fromkeys(publishers, anything)), fill_expiry=False)

    def _rules(self, caller: str | None) -> _Compiled | None:
        return _for_caller(self._callers, self._defaults, self._anonymous, caller)

    def knows(self, caller: str | None) -> bool:
        """Whether ``caller`` has rules (always, without a policy); one without gets nothing, not even a refusal.

        With ``require_sealed``, a caller without ``reply_public_key`` has none.
        """
        if self.file is None:
            return True
        rules = self._rules(caller)
        return rules is not None and (bool(rules.reply_keys) or not self.file.require_sealed)

    def reply_key(self, caller: str | None, named: str | None) -> bytes | None:
        """The public key ``caller``'s replies are sealed to, or None (plain replies).

        ``named``: the key the request names (``x-reply-public-key``), which must be one of the
        caller's (ForbiddenError); absent, the caller's first. A request naming a key for a caller
        without one is refused too: its client would drop the plain reply.
        """
        rules = self._rules(caller) if self.file is not None else None
        keys = rules.reply_keys if rules is not None else ()
        if named is None:
            return keys[0] if keys else None
        try:
            key = read_key(named)
        except SealingError:
            msg = f"header {REPLY_KEY_HEADER} must be a public key (base64 of 32 bytes)"
            raise InvalidRequestError(msg) from None
        if key not in keys:
            who = rules.name if rules is not None else "this caller"
            msg = f"reply_public_key: the key in {REPLY_KEY_HEADER} is not one of {who}'s"
            raise ForbiddenError(msg)
        return key

    def reply_allowed(self, caller: str | None, queue: str) -> bool:
        """Whether a reply to ``caller`` may go to ``queue`` (never, for a caller without rules)."""
        if self.file is None:
            return True
        rules = self._rules(caller)
        return rules is not None and rules.reply_allowed(queue)

    def _rules_or_refuse(self, caller: str | None) -> _Compiled:
        """The caller's rules; ForbiddenError when it has none, or has been cut off (``lanes = []``)."""
        rules = self._rules(caller)
        if rules is None:
            who = f"caller {caller!r}" if caller else "a request without a user_id property"
            raise ForbiddenError(_NO_RULES.format(who=who))
        if not rules.rules.lanes:
            msg = f"lanes: {rules.name} may use no lane"
            raise ForbiddenError(msg)
        return rules

    def unknown_default_instances(self, known: Collection[str]) -> list[str]:
        """The tables whose ``default_instance`` is no instance the worker has (their callers are refused)."""
        tables = [self._defaults, self._anonymous, *self._callers.values()]
        return sorted(t.name for t in tables if t is not None and t.fallback not in known and t.rules.default_instance)

    def instance_for(self, caller: str | None, named: str | None, known: Collection[str]) -> str:
        """The Clerk instance a request goes to: ``named`` (its header), else its caller's default, else ``default``.

        With a policy in force a name the caller may not use is ForbiddenError, whether or not it
        exists (a caller cannot list the instances); a name no instance has is InvalidRequestError.
        """
        rules = self._rules(caller) if self.file is not None else None
        name = named or (rules.fallback if rules is not None else DEFAULT_INSTANCE)
        if rules is not None and not rules.may_use(name):
            msg = f"instances: {rules.name} may not use instance {name!r}"
            raise ForbiddenError(msg)
        if name not in known:
            how = "" if named else f"; name one with the header {INSTANCE_HEADER}"
            msg = f"{INSTANCE_HEADER}: there is no Clerk instance {name!r}{how}"
            raise InvalidRequestError(msg)
        return name

    def may_revoke(self, caller: str | None) -> None:
        """ForbiddenError unless ``caller`` may revoke through the queue: an identified caller that is not cut off."""
        if not caller:
            msg = "revocation: a request without a user_id property cannot revoke a token"
            raise ForbiddenError(msg)
        if self.file is not None:
            self._rules_or_refuse(caller)

    def admit(self, caller: str | None, lane: Lane, request: Request) -> Request:
        """The request as it will be sent (its expiry filled in), or ForbiddenError naming the rule."""
        if self.file is None:
            return request
        rules = self._rules_or_refuse(caller)
        if self._protected is not None and self._protected.fullmatch(request.user_id):
            msg = f"protected_users: no caller may get a sign-in token for user {request.user_id!r}"
            raise ForbiddenError(msg)
        allowed = rules.rules
        if lane.value not in allowed.lanes:
            msg = f"lanes: {rules.name} may not use the {lane.value} lane"
            raise ForbiddenError(msg)
        if request.org_id is not None and not allowed.allow_org_id:
            msg = f"allow_org_id: {rules.name} may not set org_id"
            raise ForbiddenError(msg)
        expires = request.expires_in_seconds
        maximum = allowed.max_expires_in_seconds
        if expires is None:
            if self._fill_expiry:
                return msgspec.structs.replace(request, expires_in_seconds=maximum)
        elif expires > maximum:
            msg = f"max_expires_in_seconds: {rules.name} may ask for at most {maximum} seconds, not {expires}"
            raise ForbiddenError(msg)
        return request

    def admit_actor(self, caller: str | None, request: CreateActorTokenRequestBody) -> CreateActorTokenRequestBody:
        """The impersonation as it will be sent (both lifetimes filled in), or ForbiddenError naming the rule."""
        if self.file is None:
            msg = "impersonate: impersonation needs a POLICY_FILE saying who may impersonate whom"
            raise ForbiddenError(msg)
        rules = self._rules_or_refuse(caller)
        if not _IMPERSONATION_LANES & rules.rules.lanes:
            msg = f"lanes: {rules.name} may not impersonate (its lanes have neither interactive nor impersonate)"
            raise ForbiddenError(msg)
        user_id, sub = request.user_id, request.actor_sub
        if self._protected is not None and self._protected.fullmatch(user_id):
            msg = f"protected_users: no caller may impersonate user {user_id!r}"
            raise ForbiddenError(msg)
        if rules.impersonate is None or not rules.impersonate.fullmatch(user_id):
            msg = f"impersonate: {rules.name} may not impersonate user {user_id!r}"
            raise ForbiddenError(msg)
        if rules.actors is None or not rules.actors.fullmatch(sub):
            msg = f"actors: {rules.name} may not name actor {sub!r}"
            raise ForbiddenError(msg)
        allowed = rules.rules
        for key in sorted(request.actor.keys() - {"sub", *allowed.actor_keys}):
            msg = f"actor_keys: {rules.name} may not set the actor's {key!r}"
            raise ForbiddenError(msg)
        expires = _capped(request.expires_in_seconds, allowed.max_impersonation_seconds, "impersonation", rules.name)
        session = _capped(request.session_max_duration_in_seconds, allowed.max_session_seconds, "session", rules.name)
        return msgspec.structs.replace(request, expires_in_seconds=expires, session_max_duration_in_seconds=session)


def _capped(asked: int | None, maximum: int, what: str, name: str) -> int:
    """``asked``, or ``maximum`` when absent; ForbiddenError above it (``max_{what}_seconds`` names the rule)."""
    if asked is None:
        return maximum
    if asked > maximum:
        msg = f"max_{what}_seconds: {name} may ask for at most {maximum} seconds, not {asked}"
        raise ForbiddenError(msg)
    return asked


def load_policy(path: str) -> PolicyFile:
    """Read and check the policy file; ConfigError names the file and the place in it."""
    raw = read_table(_VARIABLE, path)
    callers = named_tables(_VARIABLE, path, raw, "callers")
    raw.pop("callers", None)
    policy = convert(raw, PolicyFile, _VARIABLE, path)
    # One caller at a time, so that an error names the caller (msgspec names a mapping's keys "[...]").
    rules = {name: convert(table, CallerRules, _VARIABLE, path, f"callers.{name}") for name, table in callers.items()}
    if any(not name or len(name) > 255 for name in rules):
        raise ConfigError(at(_VARIABLE, path, "callers", "a caller's name must be 1 to 255 characters"))
    anonymous = raw.get("anonymous")
    for key in _IMPERSONATION_KEYS:
        if isinstance(anonymous, dict) and key in anonymous:
            reason = "a caller without a name may never impersonate"
            raise ConfigError(at(_VARIABLE, path, f"anonymous.{key}", reason))
    policy = msgspec.structs.replace(policy, callers=rules)
    for where, table in _tables(policy):
        _check_table(path, where, table)
    return policy


def _tables(policy: PolicyFile) -> list[tuple[str, CallerRules]]:
    """Every table of rules, with where it is in the file."""
    tables = {"defaults": policy.defaults, "anonymous": policy.anonymous}
    tables.update({f"callers.{name}": table for name, table in policy.callers.items()})
    return [(where, table) for where, table in tables.items() if table is not None]


def _check_table(path: str, where: str, table: CallerRules) -> None:
    """What no type says: a default instance among its instances, no actor key of Clerk's, keys that are keys."""
    for key in table.reply_public_keys:
        try:
            read_public_key(key)
        except SealingError as exc:
            raise ConfigError(at(_VARIABLE, path, f"{where}.reply_public_key", f"not a public key: {exc}")) from None
    if table.default_instance is not None and not _Compiled(table, where).may_use(table.default_instance):
        reason = f"{table.default_instance!r} is not one of its instances"
        raise ConfigError(at(_VARIABLE, path, f"{where}.default_instance", reason))
    clerks = [key for key in table.actor_keys if key in (*CLERK_ACTOR_KEYS, "sub")]
    if clerks:
        raise ConfigError(
            at(_VARIABLE, path, f"{where}.actor_keys", f"{clerks[0]!r} is not a key a caller sets beside sub")
        )


def policy_from_settings(settings: Settings) -> Policy:
    """The policy the settings give: POLICY_FILE's, ALLOWED_PUBLISHERS' short form, or none."""
    if settings.policy_file:
        file = load_policy(settings.policy_file)
        sealed = [where for where, table in _tables(file) if table.reply_public_key is not None]
        if file.require_sealed:
            sealed.insert(0, "require_sealed")
        if sealed and not settings.reply_sealing_key_file:
            reason = "sealed replies need the worker's key: set REPLY_SEALING_KEY_FILE"
            raise ConfigError(at(_VARIABLE, settings.policy_file, sealed[0], reason))
        return Policy(file)
    return Policy.from_publishers(settings.publishers, settings.max_expires_in_seconds)
