"""structlog set-up, and the processor that keeps secrets out of every log line.

The code never logs a token or the key on purpose; the scrubber is defence
in depth: any value that looks like a sign-in token (a JWT), a Clerk secret
key, or equals the configured key is replaced, in structlog events and in
the standard-library records of the libraries we use (aio-pika, aiohttp),
which go through the same processors.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import msgspec
import structlog
from sign_in_tokens_client.wire import printable

REDACTED = "[REDACTED]"
_SECRET_PATTERNS = (
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # a JWT
    re.compile(r"\bsk_(?:live|test)_[A-Za-z0-9]+"),  # a Clerk secret key
)
_SECRET_KEYS = frozenset({"token", "sign_in_token", "actor_token", "secret", "secret_key", "authorization", "url"})


def token_field(kind: str, token_id: str | None) -> dict[str, str | None]:
    """A token's id as a log line names it: ``sign_in_token_id`` or ``actor_token_id``."""
    return {f"{kind}_id": token_id}


class Scrubber:
    """A structlog processor replacing secrets anywhere in an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        """Also redact these literal values (the configured key)."""
        self._literals = tuple(s for s in secrets if s)

    def add_secret(self, value: str) -> None:
        """Redact ``value`` from now on."""
        if value and value not in self._literals:
            self._literals = (*self._literals, value)

    def scrub_text(self, text: str) -> str:
        """Return ``text`` with every secret replaced (and octets that are not UTF-8 escaped)."""
        text = printable(text)
        for literal in self._literals:
            if literal in text:
                text = text.replace(literal, REDACTED)
        # Substring checks first: the regexes run only on text that could match.
        if "eyJ" in text or "sk_" in text:
            for pattern in _SECRET_PATTERNS:
                text = pattern.sub(REDACTED, text)
        return text

    def _scrub(self, value: object) -> object:
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, Mapping):
            return {k: REDACTED if k in _SECRET_KEYS else self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        if isinstance(value, bytes | bytearray | memoryview):
            return REDACTED
        if isinstance(value, BaseException):
            return self.scrub_text(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self,
        _logger: object,
        _method_name: str,
        event_dict: MutableMapping[str, Any],
    ) -> MutableMapping[str, Any]:
        """Scrub every value of the event in place."""
        for key, value in event_dict.items():
            event_dict[key] = REDACTED if key in _SECRET_KEYS else self._scrub(value)
        return event_dict


SCRUBBER = Scrubber()

# The fields of the request being handled, for every line logged while it is: one variable set
# once a request (structlog's contextvars set one variable a field, and merge by walking them all).
_request_fields: ContextVar[dict[str, object] | None] = ContextVar("sign_in_tokens_request_fields", default=None)


def bind_request(**fields: object) -> None:
    """Start a request's log fields (in this task and those it starts), replacing any before."""
    _request_fields.set(fields)


def bind(**fields: object) -> None:
    """Add fields to the request's log fields."""
    current = _request_fields.get()
    if current is None:
        _request_fields.set(fields)
    else:
        current.update(fields)


def _merge_request_fields(
    _logger: object,
    _method_name: str,
    event_dict: MutableMapping[str, Any],
) -> MutableMapping[str, Any]:
    fields = _request_fields.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


def _json(obj: object, **_: object) -> str:
    return _encoder.encode(obj).decode()


_encoder = msgspec.json.Encoder(enc_hook=str)


def _renderer(log_format: str) -> structlog.types.Processor:
    console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    if console:
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer(serializer=_json)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """JSON lines to stderr (console on a TTY), scrubbed, for ours and the libraries' logs."""
    shared: list[structlog.types.Processor] = [
        _merge_request_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Exceptions become text before the scrubber, so it sees their messages.
        structlog.processors.format_exc_info,
        SCRUBBER,
    ]
    renderer = _renderer(log_format)
    # Our own events are rendered and written directly (no stdlib round trip: it
    # is the hot path); the libraries' stdlib records get the same processors.
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        ),
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The AMQP and HTTP libraries are chatty at INFO about reconnects we log ourselves.
    for name in ("aio_pika", "aiormq", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs every failed connect at ERROR, then raises to us; we log the outcome once.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    # A warning at each reconnect attempt: the worker logs the loss and the return once each.
    logging.getLogger("aio_pika.robust_connection").setLevel(logging.ERROR)
    tools = logging.getLogger("aio_pika.tools")
    tools.filters[:] = [_channel_close_noise]


def _channel_close_noise(record: logging.LogRecord) -> bool:
    """Drop aio-pika's errors from its channels' close callbacks when the connection is lost.

    A robust channel's ``_on_close`` fails on a connection that is already
    gone; aio-pika logs it at ERROR, though it restores the channel itself.
    """
    return "RobustChannel._on_close" not in record.getMessage()
