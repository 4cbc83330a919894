"""Sealed replies, the first part: the worker's keys and the box that binds a token to its reply (contract v3)."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from sign_in_tokens_client.contract.errors import ConfigError, ForbiddenError, InvalidRequestError
from sign_in_tokens_client.contract.messages import Created, SignInToken
from sign_in_tokens_client.sealing import (
    ReplyOpener,
    SealingError,
    encoded,
    generate_key_file,
    open_sealed,
    public_key_of,
    read_key,
    read_key_file,
    seal,
)

from service.config import load_settings
from service.state.dedup import pack, unpack
from service.state.dedup.cipher import AnswerUnreadableError
from service.trust.policy import Policy, policy_from_settings
from service.trust.sealing import SealingKeys, read_keys

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


SEALED_POLICY = """
[callers.portal]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to"]
reply_public_key = {portal}

[callers.billing]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to"]
"""


def sealed_policy(tmp_path: Path, portal: str, extra: str = "", key_file: str | None = "k") -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(extra + SEALED_POLICY.format(portal=portal))
    env = {"POLICY_FILE": str(path)}
    if key_file:
        env["REPLY_SEALING_KEY_FILE"] = key_file
    return policy_from_settings(load_settings(env))


def test_a_callers_reply_key_is_one_of_its_policys_and_a_request_names_which(tmp_path: Path) -> None:
    """The first key by default; the other one of a roll when named; a key not listed refused, garbage invalid."""
    (_, old), (_, new), (_, stranger) = keys(), keys(), keys()
    policy = sealed_policy(tmp_path, f'["{encoded(old)}", "{encoded(new)}"]')
    assert policy.reply_key("portal", None) == old
    assert policy.reply_key("portal", encoded(new)) == new
    with pytest.raises(ForbiddenError, match="not one of caller 'portal''s"):
        policy.reply_key("portal", encoded(stranger))
    with pytest.raises(InvalidRequestError, match="x-reply-public-key must be a public key"):
        policy.reply_key("portal", "not a key")
    assert policy.reply_key("billing", None) is None  # plain replies
    with pytest.raises(ForbiddenError):
        policy.reply_key("billing", encoded(old))  # its client would drop the plain reply: refused at once
    assert policy.knows("billing")
    required = sealed_policy(tmp_path, f'"{encoded(old)}"', extra="require_sealed = true\n")
    assert required.knows("portal")
    assert not required.knows("billing")  # dead-lettered, forbidden_caller


@pytest.mark.parametrize(
    ("written", "extra", "key_file", "said"),
    [
        ('"not-a-key"', "", "k", "callers.portal.reply_public_key: not a public key"),
        ("[]", "", "k", "callers.portal.reply_public_key"),
        ('["{k}", "{k}", "{k}", "{k}", "{k}"]', "", "k", "callers.portal.reply_public_key"),
        ('"{k}"', "", None, "callers.portal: sealed replies need the worker's key: set REPLY_SEALING_KEY_FILE"),
        ("[]", "require_sealed = true\n", None, "require_sealed: sealed replies need"),
    ],
)
def test_a_policy_that_cannot_seal_is_refused_naming_the_place(
    tmp_path: Path, written: str, extra: str, key_file: str | None, said: str
) -> None:
    _, public = keys()
    text = written.replace("{k}", encoded(public))
    if extra:  # a policy requiring sealed replies, and a worker with no key to seal them
        text = f'"{encoded(public)}"'
    with pytest.raises(ConfigError, match=re.escape(said)):
        sealed_policy(tmp_path, text, extra=extra, key_file=key_file)


def test_the_workers_key_file_rolls_the_first_key_seals_and_every_key_opens_stored_answers(tmp_path: Path) -> None:
    """Two keys a line (new first): the new one seals; answers stored under the old one still open."""
    path = tmp_path / "sealing.key"
    old_public = generate_key_file(path)
    sealing = SealingKeys(str(path))
    assert sealing.public_key == old_public
    answer = Created(
        sign_in_token=SignInToken(
            object="sign_in_token",
            id="sit_1",
            status="pending",
            user_id="u",
            created_at=1,
            updated_at=1,
            token=TOKEN,
            url=URL,
        )
    )
    assert sealing.answers is not None
    stored = pack(b"request", answer, sealing.answers)
    assert TOKEN.encode() not in stored
    assert TOKEN.rsplit(".", maxsplit=1)[-1].encode() not in stored
    new = tmp_path / "new.key"
    new_public = generate_key_file(new)
    path.write_text(new.read_text() + "\n" + path.read_text())
    sealing.reload()
    assert sealing.public_key == new_public
    assert unpack(stored, sealing.answers).reply == answer
    assert unpack(pack(b"request", answer, sealing.answers), sealing.answers).reply == answer
    shown = cli("keys", "public", "--key-file", str(path), env=dict(os.environ))
    assert shown.stdout.strip() == encoded(new_public)  # the key that seals
    # The old key gone (the roll over): its answers no longer open; a file without a key is refused.
    path.write_text(new.read_text())
    sealing.reload()
    with pytest.raises(AnswerUnreadableError):
        unpack(stored, sealing.answers)
    with pytest.raises(AnswerUnreadableError):
        unpack(stored, None)
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        sealing.reload()
    assert sealing.public_key == new_public  # the keys in force are kept
    path.write_text(new.read_text() + "garbage\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_keys(str(path))


def test_a_public_key_no_secret_can_come_of_is_refused_in_the_policy_and_by_the_client(tmp_path: Path) -> None:
    """All zeros (a placeholder) is a low-order point: a policy naming it is exit 2, not a token nobody gets."""
    zero = encoded(bytes(32))
    with pytest.raises(
        ConfigError, match=re.escape("callers.portal.reply_public_key: not a public key: not a usable public key")
    ):
        sealed_policy(tmp_path, f'"{zero}"')
    private, _ = keys()
    with pytest.raises(SealingError, match="not a usable public key"):
        ReplyOpener(private, zero)


def test_the_key_file_takes_comments_and_a_raw_key_with_an_editors_newline(tmp_path: Path) -> None:
    """A 32-character comment is never taken for a key; 32 raw bytes and a newline are that key."""
    (new, new_public), (old, _) = keys(), keys()
    comment = "# rolled 2026-12-05, drop later!"
    assert len(comment) == 32
    path = tmp_path / "sealing.key"
    path.write_text(f"{comment}\n{encoded(new)}\n\n{encoded(old)}\n")
    assert read_keys(str(path)) == [new, old]
    assert SealingKeys(str(path)).public_key == new_public
    raw = bytes(range(1, 33))  # holds \n and \r: a raw key may
    for ending in (b"", b"\n", b"\r\n"):
        path.write_bytes(raw + ending)
        assert read_keys(str(path)) == [raw]
        assert read_key_file(path) == raw


@pytest.mark.parametrize("text", ["# sealing key goes in this file\n", "# the key goes in this file.\r\n", "A" * 32])
def test_a_key_file_of_32_characters_of_text_holds_no_key(tmp_path: Path, text: str) -> None:
    """A comment the length of a raw key, or a base64 key cut short (a file caught half-written): never a key."""
    path = tmp_path / "sealing.key"
    path.write_bytes(text.encode())
    with pytest.raises(ConfigError, match=r"holds no key|a key is 32 bytes"):
        read_keys(str(path))
    with pytest.raises(SealingError):
        read_key_file(path)
