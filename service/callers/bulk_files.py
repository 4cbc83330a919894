"""The bulk tool's files: the input read row by row; the output and failures written where nobody can redirect them."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

# The columns (CSV) or keys (JSON lines) a row may have.
_FIELDS: Final = ("user_id", "expires_in_seconds", "org_id")


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: where it is, what it asks for, and the message id that stands for it."""

    line: int
    user_id: str
    expires_in_seconds: int | None
    org_id: str | None
    message_id: str

    def body(self) -> bytes:
        """The request body."""
        fields: dict[str, Any] = {"user_id": self.user_id}
        if self.expires_in_seconds is not None:
            fields["expires_in_seconds"] = self.expires_in_seconds
        if self.org_id is not None:
            fields["org_id"] = self.org_id
        return msgspec.json.encode(fields)

    def fields(self) -> dict[str, Any]:
        """The row's fields, as the output and the failures file carry them."""
        return {"user_id": self.user_id, "expires_in_seconds": self.expires_in_seconds, "org_id": self.org_id}


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that cannot be sent, and why."""

    line: int
    reason: str

    @property
    def message_id(self) -> str:
        """Its key in the output: its line (nothing was sent for it)."""
        return f"bad-row-{self.line}"


def _message_id(row: dict[str, Any], occurrence: int) -> str:
    """A message id from the row's fields and which occurrence of them it is (stable across reruns)."""
    text = "\0".join(str(row.get(f)) for f in _FIELDS) + f"\0{occurrence}"
    return "bulk-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _row(line: int, raw: dict[str, Any], seen: Counter[str]) -> Row | BadRow:
    user_id = raw.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        return BadRow(line, "no user_id")
    expires = raw.get("expires_in_seconds")
    if isinstance(expires, str):
        expires = expires.strip() or None
        if expires is not None:
            if not expires.isdigit():
                return BadRow(line, f"expires_in_seconds {expires!r} is not a whole number of seconds")
            expires = int(expires)
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int) or expires < 1):
        return BadRow(line, f"expires_in_seconds {expires!r} is not a positive whole number of seconds")
    org_id = raw.get("org_id")
    if isinstance(org_id, str):
        org_id = org_id.strip() or None
    if org_id is not None and not isinstance(org_id, str):
        return BadRow(line, f"org_id {org_id!r} is not text")
    user_id = user_id.strip()
    fields = {"user_id": user_id, "expires_in_seconds": expires, "org_id": org_id}
    key = repr(tuple(fields.values()))
    seen[key] += 1
    return Row(line, user_id, expires, org_id, _message_id(fields, seen[key]))


def read_rows(path: Path) -> Iterator[Row | BadRow]:
    """Every row of a CSV or JSON lines file, numbered by its line in the file."""
    seen: Counter[str] = Counter()
    with path.open(encoding="utf-8-sig", newline="") as file:
        if is_jsonl(path):
            for line, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                try:
                    raw = msgspec.json.decode(text)
                except msgspec.DecodeError as exc:
                    yield BadRow(line, f"not JSON ({exc})")
                    continue
                yield _row(line, raw, seen) if isinstance(raw, dict) else BadRow(line, "not a JSON object")
            return
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "user_id" not in reader.fieldnames:
            msg = f"{path}: the first line must be a header naming a user_id column"
            raise BulkInputError(msg)
        for raw in reader:
            yield _row(reader.line_num, raw, seen)


# How to fix an output path the tool may not or will not write (docs/operations.md has the container case).
_OWN_DIRECTORY = (
    "write the tokens to a directory this user owns (in a container: mount one, run as its owner with --user, "
    "and work in it with -w)"
)


class BulkInputError(Exception):
    """The input file cannot be read as CSV with a header, or JSON lines; or an output path is unsafe."""


def open_private(path: Path, flags: int) -> int:
    """Open ``path`` (mode 0600), never through a symbolic link; BulkInputError when it is one."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"{path}: is a symbolic link; the tool writes tokens only to a file of its own"
            raise BulkInputError(msg) from None
        msg = f"{path}: {exc.strerror}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            msg = (
                f"{Path(os.path.abspath(path))}: cannot be written ({exc.strerror}) by this process "  # noqa: PTH100
                f"(uid {os.geteuid()}); {_OWN_DIRECTORY}"
            )
        raise BulkInputError(msg) from None
    os.fchmod(descriptor, 0o600)  # an existing file too: it holds tokens
    return descriptor


def refuse_links(*paths: Path) -> None:
    """BulkInputError when a path could lead the tokens elsewhere (checked before anything is written).

    Refused: the file itself a symbolic link; a link on its way that someone else planted (owned by
    neither this user nor root, as Linux's ``protected_symlinks`` reasons); a directory it goes
    into that another user owns or that others may write without the sticky bit (they could swap
    the file for a link between the check and the write).
    """
    me = os.geteuid()
    for path in paths:
        if path.is_symlink():
            msg = f"{path}: is a symbolic link; the tool writes tokens only to a file of its own"
            raise BulkInputError(msg)
        absolute = Path(os.path.abspath(path))  # noqa: PTH100 - the path as given, its links unresolved
        for step in absolute.parents:
            if step.is_symlink() and step.lstat().st_uid not in (me, 0):
                msg = f"{path}: {step} is a symbolic link another user owns; write the tokens elsewhere"
                raise BulkInputError(msg)
        try:
            directory = absolute.parent.stat()
        except OSError as exc:
            msg = f"{absolute.parent}: {exc.strerror}"
            raise BulkInputError(msg) from None
        if directory.st_uid not in (me, 0):
            owner = directory.st_uid
            msg = f"{path}: {absolute.parent} belongs to another user (uid {owner}, not {me}); {_OWN_DIRECTORY}"
            raise BulkInputError(msg)
        if directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not directory.st_mode & stat.S_ISVTX:
            msg = (
                f"{path}: others can write in {absolute.parent} (they could swap the file for a link); {_OWN_DIRECTORY}"
            )
            raise BulkInputError(msg)


class Output:
    """The output file: what is answered already, and an append that survives a crash of the tool."""

    def __init__(self, path: Path) -> None:
        """Open (or create, mode 0600) ``path``; a last line cut short by a crash is dropped."""
        self.path = path
        self.answered: dict[str, dict[str, Any]] = {}
        self._file = os.fdopen(open_private(path, os.O_RDWR | os.O_CREAT), "r+b")
        data = self._file.read()
        complete = data[: data.rfind(b"\n") + 1]
        for text in complete.splitlines():
            with contextlib.suppress(msgspec.DecodeError):
                entry = msgspec.json.decode(text)
                if isinstance(entry, dict) and isinstance(entry.get("message_id"), str):
                    self.answered[entry["message_id"]] = entry
        self._file.seek(len(complete))
        self._file.truncate()

    def write(self, entry: dict[str, Any]) -> None:
        """Append one answer, flushed to the operating system before it returns."""
        self._file.write(msgspec.json.encode(entry) + b"\n")
        self._file.flush()
        self.answered[entry["message_id"]] = entry

    def close(self) -> None:
        """Flush to disk and close."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` is read (and its failures written) as JSON lines rather than CSV."""
    return path.suffix.lower() in {".jsonl", ".ndjson"}


def failures_path_for(input_path: Path, output_path: Path) -> Path:
    """The default failures file: beside the output, in the input's format."""
    return output_path.with_name(output_path.name + (".failed.jsonl" if is_jsonl(input_path) else ".failed.csv"))


def write_failures(path: Path, failed: list[dict[str, Any]], *, jsonl: bool) -> None:
    """The failed rows, in the input's format, to feed back in (mode 0600)."""
    buffer = io.StringIO()
    if jsonl:
        for entry in failed:
            buffer.write(msgspec.json.encode({f: entry.get(f) for f in _FIELDS}).decode() + "\n")
    else:
        writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        for entry in failed:
            writer.writerow({f: "" if entry.get(f) is None else entry.get(f) for f in _FIELDS})
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as file:
        file.write(buffer.getvalue())
