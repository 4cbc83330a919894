"""Stored answers encrypted (contract v3): Redis's memory, its dumps and its replicas hold no usable token.

NaCl's ``SecretBox`` (XSalsa20-Poly1305, a fresh random nonce each), under a key the worker derives
from its sealing key (``service.trust.sealing``), the same in every replica sharing that key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import nacl.hash
import nacl.secret
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from sign_in_tokens_client.contract.errors import ServiceError

# What the answers' key is derived for (BLAKE2b's personalisation: 16 bytes).
_ANSWERS: Final = b"sit-idem-answers"
KEY_BYTES: Final = nacl.secret.SecretBox.KEY_SIZE


class AnswerUnreadableError(ServiceError):
    """A stored answer that no key of this worker opens (stored by a replica with another key).

    ``unsettled``: its reply's fate was not known when it was found (its token may have reached nobody).
    """

    unsettled: bool = False


class AnswerCipher:
    """Encrypts answers with the first key and opens them with any (``SecretBox``, a fresh random nonce each)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        """Encrypt with ``keys[0]``; open with each."""
        self._boxes = [nacl.secret.SecretBox(key) for key in keys]

    def encrypt(self, data: bytes) -> bytes:
        """The nonce and the ciphertext of ``data``."""
        return bytes(self._boxes[0].encrypt(data))

    def decrypt(self, data: bytes) -> bytes:
        """What ``encrypt`` was given; AnswerUnreadableError when no key opens it."""
        for box in self._boxes:
            try:
                return box.decrypt(data)
            except CryptoError:
                continue
        msg = "a stored answer does not open with the worker's keys"
        raise AnswerUnreadableError(msg)


def answers_key(private_key: bytes) -> bytes:
    """The answers' key derived from a sealing key (keyed BLAKE2b): one key never serves two purposes."""
    return nacl.hash.blake2b(b"", key=private_key, person=_ANSWERS, digest_size=KEY_BYTES, encoder=RawEncoder)
