"""The worker's sealing key (contract v3, sealed replies): it seals replies and keeps stored answers unreadable.

``REPLY_SEALING_KEY_FILE`` holds the worker's X25519 private key: 32 raw bytes, or base64. While the
key rolls it may hold several, one base64 key a line: the first seals every reply and every answer
stored from then on; the others only open the answers stored before (idempotency answers live for
the window, 10 minutes by default), so a roll never makes a stored answer unreadable.

Answers kept for idempotency hold their token encrypted (NaCl ``SecretBox``, XSalsa20-Poly1305)
under a key derived from the sealing key (BLAKE2b, keyed), the same in every replica that shares
the file, so Redis's memory, its dumps and its replicas hold no usable token. Answers kept in
process are encrypted under a key of the process's own; without the file, answers in Redis are kept
as before, and the worker says so at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sign_in_tokens_client.contract.errors import ConfigError
from sign_in_tokens_client.sealing import Sealer, SealingError, is_raw_key, read_key, without_newline

from service.config import Settings
from service.state.dedup.cipher import AnswerCipher, answers_key

_VARIABLE: Final = "REPLY_SEALING_KEY_FILE"


class SealingKeys:
    """The worker's keys: the one that seals, and the cipher of its stored answers (``reload`` reads them again)."""

    def __init__(self, path: str | None) -> None:
        """Read ``path`` (REPLY_SEALING_KEY_FILE; None: no sealing).

        ConfigError when the file cannot be read or holds no key.
        """
        self.path = path or None
        self.sealer: Sealer | None = None
        # What encrypts the answers kept in Redis (those in process have a key of the process's own).
        self.answers: AnswerCipher | None = None
        self.reload()

    def reload(self) -> None:
        """Read the file again (SIGHUP): its first key seals from now on; ConfigError keeps the keys in force."""
        if self.path is None:
            return
        keys = read_keys(self.path)
        self.sealer = Sealer(keys[0])
        self.answers = AnswerCipher([answers_key(key) for key in keys])

    @property
    def public_key(self) -> bytes | None:
        """The public key callers check their replies against (``sign-in-tokens keys public``)."""
        return self.sealer.public_key if self.sealer is not None else None


def read_keys(path: str) -> list[bytes]:
    """The keys in ``path``; ConfigError naming the line.

    32 raw bytes (and perhaps a newline; ``is_raw_key``), or base64 keys one a line, newest first;
    blank lines and lines starting with ``#`` are left out. Text is never read as raw bytes: a
    32-character comment, or a key file caught half-written, would otherwise be taken for a key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        msg = f"{_VARIABLE}: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    raw = without_newline(data)
    if is_raw_key(raw):
        return [raw]
    keys = []
    for number, line in enumerate(data.decode("ascii", errors="replace").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            try:
                keys.append(read_key(text))
            except SealingError as exc:
                msg = f"{_VARIABLE}: {path}, line {number}: {exc}"
                raise ConfigError(msg) from None
    if not keys:
        msg = f"{_VARIABLE}: {path} holds no key (make one with: sign-in-tokens keys generate FILE)"
        raise ConfigError(msg)
    return keys


def sealing_keys(settings: Settings) -> SealingKeys:
    """The keys the settings give (REPLY_SEALING_KEY_FILE read and checked); ConfigError when it is no key."""
    return SealingKeys(settings.reply_sealing_key_file)
