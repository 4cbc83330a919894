"""Sealed replies, the first part: the worker's keys and the box that binds a token to its reply (contract v3)."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from sign_in_tokens_client.sealing import (
    SealingError,
    encoded,
    generate_key_file,
    open_sealed,
    public_key_of,
    read_key,
    read_key_file,
    seal,
)

BOUND = {"id": "sit_1", "user_id": "user_1", "caller": "portal", "correlation_id": "c1", "message_id": "m1"}
TOKEN = "eyJhbGciOi.secret.token"
URL = "https://accounts.example/sign-in?__clerk_ticket=eyJhbGciOi.secret.token"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``sign-in-tokens ARGS``, to its end."""
    return subprocess.run(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, check=False, timeout=60
    )


def keys() -> tuple[bytes, bytes]:
    """A private key and its public key."""
    private = bytes(PrivateKey.generate())
    return private, public_key_of(private)


def test_a_box_opens_for_its_caller_from_the_service_and_for_nobody_else() -> None:
    service, service_public = keys()
    caller, caller_public = keys()
    sealed = seal(service, caller_public, TOKEN, URL, BOUND)
    assert TOKEN not in sealed
    assert "secret" not in base64.b64decode(sealed).decode(errors="replace")
    assert open_sealed(caller, [service_public], sealed, BOUND) == (TOKEN, URL)
    other, _ = keys()
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(other, [service_public], sealed, BOUND)  # another caller's key
    forger, forger_public = keys()
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(caller, [forger_public], sealed, BOUND)  # not the service's key
    # A forger who knows the caller's public key seals with its own key: the client, trusting the service's, refuses.
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(caller, [service_public], seal(forger, caller_public, TOKEN, URL, BOUND), BOUND)


def test_a_tampered_box_or_one_moved_into_another_reply_does_not_open() -> None:
    service, service_public = keys()
    caller, caller_public = keys()
    raw = bytearray(base64.b64decode(seal(service, caller_public, TOKEN, URL, BOUND)))
    raw[-1] ^= 1
    with pytest.raises(SealingError, match="does not open"):
        open_sealed(caller, [service_public], base64.b64encode(bytes(raw)).decode(), BOUND)
    sealed = seal(service, caller_public, TOKEN, URL, BOUND)
    for field, value in (("user_id", "user_2"), ("correlation_id", "c2"), ("caller", "billing"), ("instance", "prod")):
        with pytest.raises(SealingError, match="bound to another reply"):
            open_sealed(caller, [service_public], sealed, {**BOUND, field: value})
    with pytest.raises(SealingError, match="not base64"):
        open_sealed(caller, [service_public], "not base64!", BOUND)


def test_a_client_accepts_either_service_key_while_they_roll() -> None:
    old, old_public = keys()
    new, new_public = keys()
    caller, caller_public = keys()
    for service in (old, new):
        sealed = seal(service, caller_public, TOKEN, None, BOUND)
        assert open_sealed(caller, [old_public, new_public], sealed, BOUND) == (TOKEN, None)


def test_a_key_is_32_bytes_raw_or_base64(tmp_path: Path) -> None:
    private, _ = keys()
    assert read_key(private) == private
    assert read_key(encoded(private) + "\n") == private
    for bad in (b"", b"short", "A" * 44, encoded(private)[:-4]):
        with pytest.raises(SealingError, match="32 bytes"):
            read_key(bad)
    raw = tmp_path / "raw"
    raw.write_bytes(private)
    assert read_key_file(raw) == private


def test_keys_generate_writes_a_0600_file_once_and_keys_public_prints_its_public_key(tmp_path: Path) -> None:
    path = tmp_path / "sealing.key"
    env = {k: v for k, v in os.environ.items() if k != "REPLY_SEALING_KEY_FILE"}
    made = cli("keys", "generate", str(path), env=env)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = made.stdout.strip()
    assert len(base64.b64decode(public)) == 32
    assert public_key_of(read_key_file(path)) == base64.b64decode(public)
    shown = cli("keys", "public", env={**env, "REPLY_SEALING_KEY_FILE": str(path)})
    assert (shown.returncode, shown.stdout.strip()) == (0, public)
    assert path.read_text().strip() not in shown.stdout + made.stdout
    again = cli("keys", "generate", str(path), env=env)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "never written over" in again.stderr
    assert public_key_of(read_key_file(path)) == base64.b64decode(public)  # the key is as it was
    path.write_text("not a key")
    bad = cli("keys", "public", "--key-file", str(path), env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("sign-in-tokens: REPLY_SEALING_KEY_FILE: ")


def test_generate_key_file_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_text() == "keep me"
