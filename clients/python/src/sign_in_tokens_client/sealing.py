"""Sealed replies (contract v3): a token that only its caller can open, and that only the service can have sealed.

A NaCl box (X25519, XSalsa20-Poly1305; PyNaCl's ``Box``, libsodium underneath) from the worker's
secret key to the caller's public key: the 24-byte nonce and the ciphertext, as ``Box.encrypt``
returns them, base64 in the token object's ``sealed``. Inside, a JSON object binding the token to
its reply (``token``, ``url``, ``id``, ``user_id``, ``caller``, ``correlation_id``,
``message_id``, ``instance``), so a box moved into another reply is told apart.

Keys are 32 bytes, written as base64 (a key file may also hold the 32 raw bytes). Needs the
``sealed`` extra (``pip install 'sign-in-tokens-client[sealed]'``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import msgspec
from aio_pika.abc import AbstractIncomingMessage
from msgspec import UNSET
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from sign_in_tokens_client.connection import INSTANCE_HEADER
from sign_in_tokens_client.contract.messages import Created, Failed, Reply, created, revoked

SEALED_HEADER: Final = "x-sealed"
NACL_BOX: Final = "nacl-box"

KEY_BYTES: Final = 32
# The fields a box binds, beside the token and its URL.
BOUND: Final = ("id", "user_id", "caller", "correlation_id", "message_id", "instance")
# Boxes a Sealer keeps (one per key it has sealed to or opened from): more are computed again.
_MOST_BOXES: Final = 4096


class SealingError(ValueError):
    """A key that is not one, or a box that does not open (another key, tampered, or bound to another reply)."""


def is_raw_key(data: bytes) -> bool:
    """Whether ``data`` is a key's 32 raw bytes: 32 bytes that are not all printable text and line breaks.

    32 characters of text are a comment, or a base64 key cut short (a file caught half-written):
    never a key. A random key is all printable ASCII once in about 10^14.
    """
    return len(data) == KEY_BYTES and not all(0x20 <= byte < 0x7F or byte in b"\t\n\r" for byte in data)


def read_key(data: bytes | str) -> bytes:
    """A key's 32 bytes, from themselves (``is_raw_key``) or from base64 (whitespace around it ignored)."""
    if isinstance(data, bytes) and is_raw_key(data):
        return data
    text = data.decode("ascii", errors="replace") if isinstance(data, bytes) else data
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        msg = f"a key is {KEY_BYTES} bytes, or their base64 ({len(base64.b64encode(bytes(KEY_BYTES)))} characters)"
        raise SealingError(msg)
    return key


def read_public_key(data: bytes | str) -> bytes:
    """A public key (as ``read_key``) that a box can be made with: SealingError for a low-order point (all zeros)."""
    key = read_key(data)
    try:
        Box(PrivateKey.generate(), PublicKey(key))
    except (CryptoError, RuntimeError, ValueError, TypeError):  # libsodium refuses a key no secret can come of
        msg = "not a usable public key (a low-order point, such as all zeros)"
        raise SealingError(msg) from None
    return key


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The key in a file (32 raw bytes, or base64); OSError when it cannot be read, SealingError when it is none.

    One newline after 32 raw bytes is an editor's, not the key's (no base64 key is that short).
    """
    return read_key(without_newline(Path(path).read_bytes()))


def without_newline(data: bytes) -> bytes:
    """32 raw bytes without the newline an editor added after them; anything else as it is."""
    for end in (b"\r\n", b"\n"):
        if data.endswith(end) and is_raw_key(data[: -len(end)]):
            return data[: -len(end)]
    return data


def generate_key_file(path: str | os.PathLike[str]) -> bytes:
    """Write a new private key (base64) to a new file, mode 0600; FileExistsError rather than replace one.

    Returns the public key.
    """
    key = PrivateKey.generate()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(base64.b64encode(bytes(key)).decode() + "\n")
    return bytes(key.public_key)


def public_key_of(private_key: bytes) -> bytes:
    """The public key of a private key."""
    return bytes(PrivateKey(private_key).public_key)


def encoded(key: bytes) -> str:
    """A key as base64, as the policy and the command line write it."""
    return base64.b64encode(key).decode()


class Sealer:
    """Seals with one private key; the box of each recipient (X25519's shared key) is computed once."""

    def __init__(self, private_key: bytes) -> None:
        """Seal from ``private_key``."""
        self._private = PrivateKey(private_key)
        self.public_key = bytes(self._private.public_key)
        self._boxes: dict[bytes, Box] = {}

    def box(self, other: bytes) -> Box:
        """The box between this key and ``other``'s public key."""
        box = self._boxes.get(other)
        if box is None:
            if len(self._boxes) >= _MOST_BOXES:
                self._boxes.clear()
            box = self._boxes[other] = Box(self._private, PublicKey(other))
        return box

    def seal(self, recipient: bytes, token: str, url: str | None, bound: Mapping[str, Any]) -> str:
        """The base64 box of ``token`` and ``url``, bound to ``bound`` (BOUND's fields), for ``recipient``."""
        inside = {"token": token, "url": url, **{name: bound.get(name) for name in BOUND}}
        return base64.b64encode(bytes(self.box(recipient).encrypt(msgspec.json.encode(inside)))).decode()

    def open(self, senders: Iterable[bytes], sealed: str, bound: Mapping[str, Any]) -> tuple[str, str | None]:
        """The token and URL of a box one of ``senders`` sealed for this key, bound to ``bound``.

        SealingError when no sender's key opens it, or when a bound field differs from ``bound``.
        """
        try:
            ciphertext = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            msg = "sealed is not base64"
            raise SealingError(msg) from None
        for sender in senders:
            try:
                inside = msgspec.json.decode(self.box(sender).decrypt(ciphertext))
            except (CryptoError, ValueError, msgspec.DecodeError):
                continue
            if not isinstance(inside, dict) or not isinstance(inside.get("token"), str):
                break
            if any(inside.get(name) != bound.get(name) for name in BOUND):
                msg = "the box is bound to another reply"
                raise SealingError(msg)
            url = inside.get("url")
            return inside["token"], url if isinstance(url, str) else None
        msg = "the box does not open with the service's keys"
        raise SealingError(msg)


def seal(private_key: bytes, recipient: bytes, token: str, url: str | None, bound: Mapping[str, Any]) -> str:
    """The base64 box of ``token`` and ``url`` from ``private_key``, bound to ``bound``, for ``recipient``."""
    return Sealer(private_key).seal(recipient, token, url, bound)


def open_sealed(
    private_key: bytes, senders: Iterable[bytes], sealed: str, bound: Mapping[str, Any]
) -> tuple[str, str | None]:
    """The token and URL of a box one of ``senders`` sealed for ``private_key`` (see ``Sealer.open``)."""
    return Sealer(private_key).open(senders, sealed, bound)


Key = bytes | str


class ReplyOpener:
    """A client's side of sealed replies: its private key, the service's public keys (several while one rolls)."""

    def __init__(self, private_key: Key, service_public_key: Key | Iterable[Key]) -> None:
        """Keys as 32 bytes or base64; SealingError for one that is not a key, or no service key."""
        self._sealer = Sealer(read_key(private_key))
        keys = [service_public_key] if isinstance(service_public_key, bytes | str) else list(service_public_key)
        self._senders = tuple(read_public_key(key) for key in keys)
        if not self._senders:
            msg = "service_public_key: give the service's public key (sign-in-tokens keys public prints it)"
            raise SealingError(msg)
        # What the client names in REPLY_KEY_HEADER: the key the service seals its replies to.
        self.public_key = encoded(self._sealer.public_key)

    def open(self, reply: Reply, bound: Mapping[str, Any]) -> Reply:
        """The reply with its token opened (a failure as it is); SealingError says why it is forged.

        ``bound``: what the box must be bound to (BOUND's fields but ``id`` and ``user_id``, the
        token's own). A token in clear is refused, created or revoked: the service seals both for a
        sealed caller, so one in clear is forged (a revocation's answer too: a forger's "revoked"
        would leave a live token believed dead).
        """
        if isinstance(reply, Failed):
            return reply
        token = reply.token_object
        if not isinstance(token.sealed, str):  # the service seals every token it sends a sealed caller
            msg = "a token in clear (this client takes sealed replies only)"
            raise SealingError(msg)
        secret, url = self._sealer.open(
            self._senders, token.sealed, {**bound, "id": token.id, "user_id": token.user_id}
        )
        opened = msgspec.structs.replace(token, token=secret, url=url, sealed=UNSET)
        return created(opened) if isinstance(reply, Created) else revoked(opened)

    def open_reply(
        self, reply: Reply, message: AbstractIncomingMessage, caller: str | None, message_id: str, instance: str | None
    ) -> Reply:
        """``reply``, decoded from ``message``, opened: bound to its caller, its request and its Clerk instance.

        ``instance``: the one the request named (None: any, its caller's default). SealingError says
        why it is forged.
        """
        named = (message.headers or {}).get(INSTANCE_HEADER)
        if isinstance(named, bytes):
            named = named.decode(errors="replace")
        if instance is not None and named != instance and not isinstance(reply, Failed):
            msg = "a token of another Clerk instance"
            raise SealingError(msg)
        bound = {"caller": caller or "", "correlation_id": message.correlation_id, "message_id": message_id}
        return self.open(reply, {**bound, "instance": named})
