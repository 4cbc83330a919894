"""The TOML files an operator writes (POLICY_FILE, CLERK_INSTANCES_FILE): read, then checked strictly.

Every error is one line naming the variable, the file and the place in it
(``POLICY_FILE: /etc/sit/policy.toml at callers.portal.lanes[1]: Expected ...``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from sign_in_tokens_client.contract.errors import ConfigError

_PATH_IN_ERROR: Final = re.compile(r" - at `\$\.?(.*)`$")
T = TypeVar("T")


def read_table(variable: str, path: str) -> dict[str, Any]:
    """The file at ``path`` as a TOML table; ConfigError when it cannot be read or is not TOML."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{variable}: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    except UnicodeDecodeError:
        msg = f"{variable}: {path} is not UTF-8 text"
        raise ConfigError(msg) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{variable}: {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None


def named_tables(variable: str, path: str, raw: object, key: str) -> dict[str, Any]:
    """``raw[key]`` (absent: empty), which must be a table of tables (``[callers.NAME]``)."""
    found = raw.get(key, {}) if isinstance(raw, dict) else {}
    if not isinstance(found, dict):
        msg = f"{variable}: {path} at {key}: Expected a table of {key}, got {type(found).__name__}"
        raise ConfigError(msg)
    return found


def convert(raw: object, type_: type[T], variable: str, path: str, where: str = "") -> T:
    """``raw`` as ``type_``; ConfigError naming the file and the place (``where``, then msgspec's path)."""
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_IN_ERROR.search(message)
        inner = match.group(1) if match else ""
        place = ".".join(part for part in (where, inner) if part).replace(".[", "[")
        reason = message[: match.start()] if match else message
        raise ConfigError(at(variable, path, place, reason)) from None


def at(variable: str, path: str, place: str, reason: str) -> str:
    """The one line of an error at ``place`` in the file (control characters written as escapes)."""
    return _one_line(f"{where(variable, path, place)}: {reason}")


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def where(variable: str, path: str, place: str) -> str:
    """A place in the file, as an error names it (``VARIABLE: PATH at PLACE``)."""
    return f"{variable}: {path}{f' at {place}' if place else ''}"
