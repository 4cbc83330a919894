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
import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import aio_pika
import msgspec
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection, FieldValue
from sign_in_tokens_client.connection import CHANNEL_FAILURES, INSTANCE_HEADER, REPLY_KEY_HEADER, open_connection
from sign_in_tokens_client.contract.messages import JSON, Failed, Reply, decode_reply, outcome
from sign_in_tokens_client.replies import for_user, forged_because
from tqdm import tqdm

if TYPE_CHECKING:
    from sign_in_tokens_client.sealing import ReplyOpener

from service.callers.bulk_files import (
    BadRow,
    BulkInputError,
    Output,
    Row,
    is_jsonl,
    read_rows,
    refuse_links,
    write_failures,
)

log = structlog.get_logger(__name__)

# How long a request's worth of rate a run keeps outstanding, by default (see ``default_outstanding``).
OUTSTANDING_SECONDS: Final = 60.0
_RETRY_PUBLISH_SECONDS: Final = 1.0
# The longest a rerun waits for the replies a crashed run left in its queue before sending again.
_LEFT_PATIENCE_SECONDS: Final = 30.0
# A run ends when no reply has come for this long while rows are outstanding (``--reply-timeout``).
REPLY_TIMEOUT_SECONDS: Final = 120.0


def default_outstanding(rate_limit: int, window_seconds: float) -> int:
    """A minute of the rate limit: enough to keep the bulk lane busy, not the whole file at once."""
    return max(100, min(10_000, int(rate_limit / window_seconds * OUTSTANDING_SECONDS)))


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
    # The Clerk instance every request names (x-clerk-instance); None: the caller's default.
    instance: str | None = None
    # Sealed replies: the caller's private key and the service's public keys (the reply key header names its own).
    opener: ReplyOpener | None = None


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
        headers: dict[str, FieldValue] = {}
        if service.instance is not None:
            headers[INSTANCE_HEADER] = service.instance
        if service.opener is not None:
            headers[REPLY_KEY_HEADER] = service.opener.public_key
        self._headers = headers or None
        self._instance = service.instance
        self._opener = service.opener
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
                headers=self._headers,
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
                if self._opener is not None:
                    reply = self._opener.open_reply(reply, message, self._caller, row.message_id, self._instance)
            except msgspec.DecodeError:
                reason = "not a reply the service writes"
            except ValueError as exc:  # SealingError: a box that does not open, or a token in clear
                reason = str(exc)
            else:
                if not for_user(row.user_id)(reply):
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
            elif isinstance(reply.token_object.sealed, str):  # no key to open it
                entry.update(outcome="failed", error=_SEALED)
            else:
                entry.update(outcome=outcome(reply), sign_in_token=msgspec.to_builtins(reply.token_object))
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


# A sealed reply to a run without the keys to open it: failed, its row in the failures file to send again with them.
_SEALED: Final = {
    "code": "sealed_reply",
    "message": "the reply is sealed: run again with --private-key-file and --service-public-key",
}


async def _first(*awaitables: Any) -> None:  # noqa: ANN401 - coroutines of any result
    """Wait until the first of ``awaitables`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
