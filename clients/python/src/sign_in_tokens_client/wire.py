"""Reading any AMQP properties RabbitMQ accepts, so one odd message cannot break the connection.

RabbitMQ passes message properties through as the publisher wrote them. The
AMQP 0-9-1 short string is a run of octets, and RabbitMQ checks neither
UTF-8 nor the size of a timestamp, but pamqp (under aiormq and aio-pika)
decodes strictly: a ``correlation_id`` or a header name that is not UTF-8
raises ``UnicodeDecodeError``, a timestamp in microseconds raises
``ValueError`` (year out of range). aiormq turns either into
``InvalidFrameError`` and drops the whole connection; the message is
redelivered, breaks the connection again, and every request in flight on it
is returned, until the queue's delivery limit dead-letters them unanswered.

``install`` replaces pamqp's codecs for short strings, tables and
timestamps, for the pamqp version this module was written against
(``PAMQP_VERSION``, pinned in the service's pyproject.toml; a test fails on any other):

- short strings (every string property) and field-table names decode with
  ``surrogateescape`` and encode the same way, so the original octets
  survive the round trip: a reply echoes the caller's ``correlation_id``
  byte for byte, and a dead-lettered copy keeps its headers as they were;
- a timestamp too large for seconds or milliseconds (pamqp's own guess) is
  read as microseconds or nanoseconds, and one no date can hold as absent.

(A ``delivery_mode`` other than 1 or 2, on which aio-pika would raise, never
arrives: RabbitMQ refuses it at publish, ``PRECONDITION_FAILED``.)

Strings holding escaped octets are legal Python but not UTF-8: ``printable``
gives a form safe for logs and JSON.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import struct
from importlib import metadata
from typing import Final

from pamqp import common, decode, encode

PAMQP_VERSION: Final = "4.0.1"

_ESCAPE: Final = "surrogateescape"
_TIMESTAMP_DIVISORS: Final = (1, 1_000, 1_000_000, 1_000_000_000)
_MAX_SECONDS: Final = 0xFFFFFFFF


def printable(text: str) -> str:
    r"""``text`` as valid UTF-8: escaped octets become ``\xNN``."""
    if text.isascii():
        return text
    return text.encode("utf-8", _ESCAPE).decode("utf-8", "backslashreplace")


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        msg = "Could not unpack short string value"
        raise ValueError(msg) from err
    return length + 1, value[1 : length + 1].decode("utf-8", _ESCAPE)


def _timestamp(value: bytes) -> tuple[int, dt.datetime | None]:
    try:
        seconds = common.Struct.timestamp.unpack(value[0:8])[0]
    except (struct.error, TypeError) as err:
        msg = "Could not unpack timestamp value"
        raise ValueError(msg) from err
    # pamqp's own guess first: past 0xFFFFFFFF seconds (the year 2106) it is milliseconds.
    divisors = _TIMESTAMP_DIVISORS[1:] if seconds > _MAX_SECONDS else _TIMESTAMP_DIVISORS
    for divisor in divisors:
        try:
            return 8, dt.datetime.fromtimestamp(seconds / divisor, tz=dt.UTC)
        except (ValueError, OverflowError, OSError):
            continue
    return 8, None


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """Pamqp's ``decode.field_table``, with names decoded like short strings."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, common.FieldValue] = {}
        end = offset + length
        if end > len(value):
            msg = "Field table length exceeds available data"
            raise ValueError(msg)
        while offset < end:
            consumed, key = _short_str(value[offset:])
            offset += consumed
            if offset > end:
                msg = "Field table key length exceeds data"
                raise ValueError(msg)
            consumed, data[key] = decode.embedded_value(value[offset:])
            offset += consumed
    except (struct.error, TypeError) as err:
        msg = "Could not unpack data"
        raise ValueError(msg) from err
    return end, data


def _encode_string(encoder: struct.Struct, value: str) -> bytes:
    if not isinstance(value, str):
        msg = f"str required, received {type(value)}"
        raise TypeError(msg)
    data = value.encode("utf-8", _ESCAPE)
    return encoder.pack(len(data)) + data


def _encode_field_table(value: common.FieldTable) -> bytes:
    """Pamqp's ``encode.field_table``, with names encoded like short strings."""
    if not value:
        return common.Struct.integer.pack(0)
    if not isinstance(value, dict):
        msg = f"dict required, received {type(value)}"
        raise TypeError(msg)
    parts = []
    for key, item in sorted(value.items()):
        parts.append(_encode_string(common.Struct.byte, key))
        parts.append(encode.encode_table_value(item))
    output = b"".join(parts)
    return common.Struct.integer.pack(len(output)) + output


def install() -> None:
    """Make pamqp read (and write back) any properties RabbitMQ accepts; idempotent.

    Only on the pamqp this was written for: another version is left as it is (strict), as plain
    aio-pika reads (the service pins this one; the client library alone does not).
    """
    if installed_version() != PAMQP_VERSION:
        _not_patched()
        return
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["timestamp"] = _timestamp
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"T"] = _timestamp
    decode.TABLE_MAPPING[b"F"] = _field_table
    encode._string = _encode_string  # noqa: SLF001 - short and long strings both go through it
    encode.field_table = _encode_field_table
    encode.METHODS["table"] = _encode_field_table


@functools.cache
def _not_patched() -> None:
    """Say once that pamqp reads strictly here: an odd property from any publisher drops the connection."""
    logging.getLogger(__name__).warning(
        "pamqp_not_patched", extra={"pamqp": installed_version(), "written_for": PAMQP_VERSION}
    )


def installed_version() -> str:
    """The pamqp version in use (the patch is written for ``PAMQP_VERSION``)."""
    return metadata.version("pamqp")
