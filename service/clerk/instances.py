"""The Clerk instances one service fronts (contract v3, "several Clerk instances").

``CLERK_INSTANCES_FILE`` (TOML) names each instance: its key (``secret_key``, or ``secret_key_file``
read at start and on SIGHUP), its API URL, its rate limit and window::

    [instances.prod]
    secret_key_file = "/run/secrets/clerk-prod"
    rate_limit = 1000

    [instances.staging]
    secret_key_file = "/run/secrets/clerk-staging"

Without the file, ``CLERK_SECRET_KEY`` (or ``_FILE``), ``CLERK_API_URL`` and ``CLERK_RATE_LIMIT``
make one instance named ``default``: a deployment of one key changes nothing.

An instance's name is its label in metrics and audit events and the suffix of the queue its
requests wait in while it is held: lowercase letters, digits, ``_`` and ``-``, at most 32. Shared
state (the rate window, the idempotency answers, the grants) is keyed by its ``state_id`` (its
name unless set), never by its key, so a key rotation keeps all three. Every error is one line
naming the file and the place, as for the policy file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta
from sign_in_tokens_client.connection import DEFAULT_INSTANCE, INSTANCE_NAME
from sign_in_tokens_client.contract.errors import ConfigError

from service.config import Secret, Settings, check_key, key_rate_limit, masked_key, read_key_file
from service.tomlfiles import at, convert, named_tables, read_table
from service.tomlfiles import where as place
from service.urls import check_clerk_url, check_url, masked_url

_VARIABLE: Final = "CLERK_INSTANCES_FILE"
# Bounded: a metric label, an audit field, a queue name's suffix.
InstanceName = Annotated[str, Meta(pattern=INSTANCE_NAME)]
MAX_INSTANCES: Final = 32


class InstanceEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One ``[instances.NAME]`` table as written."""

    secret_key: str | None = None
    secret_key_file: Annotated[str, Meta(min_length=1)] | None = None
    api_url: str | None = None
    rate_limit: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    rate_window_seconds: Annotated[float, Meta(gt=0, le=3600)] | None = None
    state_id: InstanceName | None = None


class _File(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The file's top level: only ``[instances]``."""

    instances: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Instance:
    """One Clerk instance, its key read."""

    name: str
    secret_key: Secret
    api_url: str
    rate_limit: int
    rate_window_seconds: float
    state_id: str

    def key_id(self) -> str:
        """The digest of the key under which earlier versions kept state in Redis (never the key)."""
        return hashlib.sha256(self.secret_key.reveal().encode()).hexdigest()[:16]

    def shown(self) -> str:
        """How ``config`` shows it: everything but the key, which is masked."""
        return (
            f"{self.name}: key {masked_key(self.secret_key)}, {masked_url(self.api_url)}, "
            f"{self.rate_limit} calls in {self.rate_window_seconds:g} s, state {self.state_id}"
        )


def load_instances(settings: Settings, path: str | None) -> dict[str, Instance]:
    """The instances of the file at ``path`` (CLERK_INSTANCES_FILE), else the one of CLERK_SECRET_KEY, ``default``.

    ConfigError (one line) for a file that cannot be read, is not TOML, breaks the schema, or names a
    key file that cannot be read, a key that is not one, or a URL that would send the key in clear.
    """
    if not path:
        key_file = settings.clerk_secret_key_file
        # The key file read again each time (SIGHUP: a rotated key), as at start.
        key = read_key_file(key_file) if key_file else settings.secret_key()
        check_key("CLERK_SECRET_KEY_FILE", key)
        return {
            DEFAULT_INSTANCE: Instance(
                DEFAULT_INSTANCE,
                Secret(key),
                settings.clerk_api_url,
                settings.rate_limit,
                settings.clerk_rate_window_seconds,
                DEFAULT_INSTANCE,
            )
        }
    raw = read_table(_VARIABLE, path)
    convert(raw, _File, _VARIABLE, path)
    tables = named_tables(_VARIABLE, path, raw, "instances")
    if not 1 <= len(tables) <= MAX_INSTANCES:
        raise ConfigError(at(_VARIABLE, path, "instances", f"name 1 to {MAX_INSTANCES} instances"))
    found = {name: _instance(settings, path, name, table) for name, table in tables.items()}
    states = [instance.state_id for instance in found.values()]
    keys = [instance.secret_key for instance in found.values()]
    for instance in found.values():
        if states.count(instance.state_id) > 1:
            reason = f"{instance.state_id!r} is another instance's state too: each keeps its own"
            raise ConfigError(at(_VARIABLE, path, f"instances.{instance.name}.state_id", reason))
        if keys.count(instance.secret_key) > 1:
            # Clerk limits a key, not an instance: two limits for one key would be twice Clerk's.
            reason = "another instance has the same key: one instance a key"
            raise ConfigError(at(_VARIABLE, path, f"instances.{instance.name}", reason))
    return found


def _instance(settings: Settings, path: str, name: str, table: object) -> Instance:
    where = f"instances.{name}"
    if name.startswith("sk_"):  # a key pasted as the table's name: never shown
        raise ConfigError(at(_VARIABLE, path, "instances", "a table is named with a key: name it after the instance"))
    convert(name, InstanceName, _VARIABLE, path, where)
    entry = convert(table, InstanceEntry, _VARIABLE, path, where)
    if (entry.secret_key is None) == (entry.secret_key_file is None):
        raise ConfigError(at(_VARIABLE, path, where, "set secret_key or secret_key_file (one of them)"))
    if entry.secret_key_file is None:
        key = entry.secret_key or ""
    elif entry.secret_key_file.startswith("sk_"):
        reason = "that is a key, not a file's path: put the key in a file (or in secret_key)"
        raise ConfigError(at(_VARIABLE, path, f"{where}.secret_key_file", reason))
    else:
        key = read_key_file(entry.secret_key_file, place(_VARIABLE, path, f"{where}.secret_key_file"))
    check_key(place(_VARIABLE, path, where), key)
    api_url = entry.api_url or settings.clerk_api_url
    try:
        check_url("api_url", api_url, ("http", "https"))
        check_clerk_url(api_url)
    except ConfigError as exc:
        raise ConfigError(at(_VARIABLE, path, f"{where}.api_url", str(exc).split(": ", 1)[-1])) from None
    return Instance(
        name,
        Secret(key),
        api_url,
        entry.rate_limit or key_rate_limit(key),
        entry.rate_window_seconds or settings.clerk_rate_window_seconds,
        entry.state_id or name,
    )
