"""``sign-in-tokens bulk``: a file of users in, a file of tokens out, resumable.

Rows come from CSV (a header row with a ``user_id`` column, optional
``expires_in_seconds`` and ``org_id``) or JSON lines (``.jsonl``), and go to
the bulk lane with publisher confirms, at most ``max_outstanding`` without a
reply. Replies come to a durable queue of the tool's own, named after the
output file, so a crash of the tool loses none: they wait there for the rerun.
Each reply becomes one JSON line in the output file (mode 0600: it holds
tokens), written and flushed before the reply is acknowledged.

A rerun with the same arguments reads the output first and skips every row
already answered; each row's ``message_id`` comes from the row itself (its
fields and which occurrence of them it is), so a row sent again within the
service's idempotency window gets the answer it got before, not a second
token. A bad row (no ``user_id``, a number that is not one) is reported
with its line number, written to the output as failed, and the run goes on.
Failed rows are also written to a failures file in the input's format, to be
fed back in.

Trust (contract v3): requests carry the tool's broker user as ``user_id``; a
reply is written only when the service's broker user published it
(``user_id``), for this caller (``x-caller``), with a token for the row's
user; anything else is dropped as forged (``forged_reply_dropped``). The
output and failures files are never written through a symbolic link. A run
whose replies stop coming (its requests refused by the policy, say) ends
after ``reply_timeout`` seconds without one, with one line, resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import hashlib
import io
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import aio_pika
import msgspec
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from tqdm import tqdm

from service.broker import CHANNEL_FAILURES, open_connection
from service.client import forged_because
from service.messages import JSON, Created, Failed, Reply, decode_reply, outcome

log = structlog.get_logger(__name__)

# How long a request's worth of rate a run keeps outstanding, by default (see ``default_outstanding``).
OUTSTANDING_SECONDS: Final = 60.0
_FIELDS: Final = ("user_id", "expires_in_seconds", "org_id")
_RETRY_PUBLISH_SECONDS: Final = 1.0
# The longest a rerun waits for the replies a crashed run left in its queue before sending again.
_LEFT_PATIENCE_SECONDS: Final = 30.0
# A run ends when no reply has come for this long while rows are outstanding (``--reply-timeout``).
REPLY_TIMEOUT_SECONDS: Final = 120.0


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


def default_outstanding(rate_limit: int, window_seconds: float) -> int:
    """A minute of the rate limit: enough to keep the bulk lane busy, not the whole file at once."""
    return max(100, min(10_000, int(rate_limit / window_seconds * OUTSTANDING_SECONDS)))


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


def report(summary: Summary, output: Path, failures: Path) -> str:
    """What a run says at its end: one line."""
    parts = [f"{summary.text()}; output {output}; failures {failures}"]
    if summary.bad_rows:
        parts.append(f"{summary.bad_rows} bad rows (their lines are in the log above, and failed in the output)")
    if summary.silent_for is not None:
        parts.append(
            f"no reply for {summary.silent_for:g} s with {summary.unanswered} rows unanswered: the service may be "
            "refusing them (this caller's lanes, or a reply queue its policy does not list: sign-in-tokens-bulk.*, "
            "see the dead-letter queue) or be down; rerun the same command to resume"
        )
    elif not summary.complete:
        parts.append("stopped before every row was answered; rerun the same command to resume")
    return "; ".join(parts)


def reply_queue_name(output: Path, user: str) -> str:
    """The tool's durable reply queue for this output file and broker user (the same on a rerun).

    ``sign-in-tokens-bulk.<user>.``: a deployment may grant each caller its own prefix only.
    """
    return f"sign-in-tokens-bulk.{user}." + hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]


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


@dataclass
class Summary:
    """What a run leaves: rows in all, and their outcomes."""

    rows: int
    outcomes: Counter[str]
    bad_rows: int
    complete: bool
    # Seconds without a reply after which the run gave up, with rows unanswered (None: it did not).
    silent_for: float | None = None
    unanswered: int = 0

    def text(self) -> str:
        """One line."""
        failed = {k: v for k, v in self.outcomes.items() if k != "created"}
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        return (
            f"{self.rows} rows: {self.outcomes['created']} created, {sum(failed.values())} failed"
            f"{f' ({detail})' if detail else ''}"
        )


@dataclass(frozen=True, slots=True)
class BulkService:
    """Where the tool finds the service, and who speaks on either side."""

    amqp_url: str
    bulk_queue: str
    # The tool's broker user (its requests' ``user_id``), and the service's: the only one whose replies are written.
    caller: str
    service_user: str


class BulkRun:
    """One run of the tool over an input file."""

    def __init__(
        self,
        service: BulkService,
        input_path: Path,
        output_path: Path,
        failures_path: Path,
        max_outstanding: int,
        *,
        reply_timeout: float = REPLY_TIMEOUT_SECONDS,
        progress: bool = True,
    ) -> None:
        """Prepare; ``run`` does the work."""
        self._url = service.amqp_url
        self._caller = service.caller
        self._service_user = service.service_user
        self._reply_timeout = reply_timeout
        self._last_reply = 0.0
        self.timed_out = False
        self._bulk_queue = service.bulk_queue
        self._input = input_path
        self._output_path = output_path
        self._failures = failures_path
        self._slots = asyncio.Semaphore(max_outstanding)
        self._progress = progress
        self._waiting: dict[str, Row] = {}
        self._holding: set[str] = set()  # rows sent and not answered: each holds one of the slots
        self._received = 0  # replies consumed; the first ``_left`` were in the queue before this run
        self._left = 0
        self._left_read = asyncio.Event()
        self._all_answered = asyncio.Event()
        self._output: Output | None = None
        self._bar: tqdm[Any] | None = None
        self._connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Self:
        """Nothing to open before ``run``."""
        return self

    async def __aexit__(self, *_: object) -> None:
        """Close what ``run`` opened."""
        if self._bar is not None:
            self._bar.close()
        if self._output is not None:
            self._output.close()
        if self._connection is not None:
            with contextlib.suppress(*CHANNEL_FAILURES, RuntimeError):
                await self._connection.close()

    async def run(self, stop: asyncio.Event) -> Summary:
        """Send every row not yet answered, write every reply; return when all are answered, at ``stop``, or silence."""
        refuse_links(self._output_path, self._failures)
        try:
            rows = list(read_rows(self._input))
        except UnicodeDecodeError as exc:
            msg = f"{self._input}: not UTF-8 text (byte {exc.start})"
            raise BulkInputError(msg) from None
        except csv.Error as exc:
            msg = f"{self._input}: not CSV ({exc})"
            raise BulkInputError(msg) from None
        output = self._output = Output(self._output_path)
        for bad in rows:
            if isinstance(bad, BadRow):
                log.warning("bad_row", line=bad.line, reason=bad.reason)
                if bad.message_id not in output.answered:
                    error = {"code": "invalid_request", "message": f"line {bad.line}: {bad.reason}"}
                    output.write({"line": bad.line, "message_id": bad.message_id, "outcome": "failed", "error": error})
        good = [r for r in rows if isinstance(r, Row)]
        self._waiting = {r.message_id: r for r in good if r.message_id not in output.answered}
        self._bar = tqdm(
            total=len(rows), initial=len(rows) - len(self._waiting), unit="row", desc="bulk", disable=not self._progress
        )
        if self._waiting:
            self._connection = await open_connection(self._url, "sign-in-tokens-bulk")
            channel = await self._connection.channel(publisher_confirms=True)
            queue_name = reply_queue_name(self._output_path, self._caller)
            queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
            await channel.set_qos(prefetch_count=1000)
            consumer = await queue.consume(self._on_reply)
            # Replies a run that crashed left behind are read before anything is sent again.
            self._left = queue.declaration_result.message_count or 0
            if self._left > self._received:
                self._left_read.clear()  # a reply consumed before the count was known may have set it
                log.info("reading_replies_left", replies=self._left)
                await _first(self._left_read.wait(), stop.wait(), asyncio.sleep(_LEFT_PATIENCE_SECONDS))
            self._last_reply = time.monotonic()
            await _first(self._publish_all(channel, queue_name, stop), self._silence())
            await _first(self._all_answered.wait(), stop.wait(), self._silence())
            if self._all_answered.is_set():
                with contextlib.suppress(*CHANNEL_FAILURES):
                    await queue.cancel(consumer)  # first: a queue deleted under its consumer is logged as an error
                    await queue.delete(if_unused=False, if_empty=False)
        failed = [e for e in output.answered.values() if e.get("outcome") == "failed" and "user_id" in e]
        write_failures(self._failures, failed, jsonl=is_jsonl(self._input))
        outcomes: Counter[str] = Counter(
            e["outcome"] if e.get("outcome") == "created" else e.get("error", {}).get("code", "failed")
            for e in output.answered.values()
        )
        complete = all(r.message_id in output.answered for r in rows)
        silent_for = self._reply_timeout if self.timed_out and not complete else None
        bad_rows = sum(isinstance(r, BadRow) for r in rows)
        return Summary(len(rows), outcomes, bad_rows, complete, silent_for, len(self._waiting))

    async def _publish_all(self, channel: AbstractRobustChannel, reply_to: str, stop: asyncio.Event) -> None:
        for row in list(self._waiting.values()):
            await _first(self._slots.acquire(), stop.wait())
            if stop.is_set():
                return
            if row.message_id not in self._waiting:  # answered meanwhile (a reply a crashed run left)
                self._slots.release()
                continue
            self._holding.add(row.message_id)
            message = aio_pika.Message(
                row.body(),
                content_type=JSON,
                message_id=row.message_id,
                correlation_id=row.message_id,
                reply_to=reply_to,
                user_id=self._caller,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            while not stop.is_set():
                try:
                    await channel.default_exchange.publish(message, self._bulk_queue)
                    break
                except CHANNEL_FAILURES as exc:
                    log.warning("publish_failed", line=row.line, reason=type(exc).__name__, action="retrying")
                    await _first(asyncio.sleep(_RETRY_PUBLISH_SECONDS), stop.wait())

    async def _silence(self) -> None:
        """Return once no reply has come for ``reply_timeout`` seconds while rows wait for one."""
        while True:
            quiet = time.monotonic() - self._last_reply
            if quiet >= self._reply_timeout and self._waiting:
                self.timed_out = True
                return
            await asyncio.sleep(max(0.05, self._reply_timeout - quiet))

    def _authentic(self, message: AbstractIncomingMessage, row: Row) -> Reply | None:
        """The reply, when the service sent it to this caller about ``row``; None (logged) when forged."""
        reason = forged_because(message, self._service_user, self._caller)
        reply = None
        if reason is None:
            try:
                reply = decode_reply(message.body, message.content_type)
            except msgspec.DecodeError:
                reason = "not a reply the service writes"
            else:
                if isinstance(reply, Created) and reply.sign_in_token.user_id != row.user_id:
                    reason = "a token for another user"
        if reason is not None:
            log.warning("forged_reply_dropped", reason=reason, line=row.line, user_id=message.user_id)
            return None
        return reply

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self._received += 1
        if self._received >= self._left:
            self._left_read.set()
        output = self._output
        key = message.correlation_id or ""
        row = self._waiting.get(key)
        reply = None if row is None else self._authentic(message, row)
        if row is not None and reply is not None and output is not None:
            del self._waiting[key]
            self._last_reply = time.monotonic()
            entry: dict[str, Any] = {"line": row.line, "message_id": row.message_id, **row.fields()}
            if isinstance(reply, Failed):
                entry.update(outcome="failed", error=msgspec.to_builtins(reply.error))
            else:
                entry.update(outcome=outcome(reply), sign_in_token=msgspec.to_builtins(reply.sign_in_token))
            output.write(entry)
            if key in self._holding:
                self._holding.discard(key)
                self._slots.release()
            if self._bar is not None:
                self._bar.update()
        # A reply to a row answered before (a duplicate), or a forged one, is only acknowledged.
        await message.ack()
        if not self._waiting:
            self._all_answered.set()


async def _first(*awaitables: Any) -> None:  # noqa: ANN401 - coroutines of any result
    """Wait until the first of ``awaitables`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
