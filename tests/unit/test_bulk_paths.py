"""Where the bulk tool agrees to write tokens: never where another user could redirect them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sign_in_tokens_client.contract.errors import ConfigError

from service.callers.bulk_files import BulkInputError, open_private, refuse_links
from service.config import read_key_file

STRANGER = 54321
NOBODY = 65534


def test_a_file_in_a_directory_of_ones_own_is_taken(tmp_path: Path) -> None:
    refuse_links(tmp_path / "tokens.jsonl", tmp_path / "tokens.failed.csv")


def test_a_link_of_ones_own_on_the_way_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "reports").symlink_to(tmp_path / "real")
    refuse_links(tmp_path / "reports" / "tokens.jsonl")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link to another user needs root")
def test_a_link_another_user_planted_on_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    link = tmp_path / "reports"
    link.symlink_to(tmp_path / "victim")
    os.lchown(link, STRANGER, STRANGER)
    with pytest.raises(BulkInputError, match="reports is a symbolic link another user owns"):
        refuse_links(link / "tokens.jsonl")


def test_a_directory_others_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(BulkInputError, match="others can write in"):
        refuse_links(shared / "tokens.jsonl")
    shared.chmod(0o1777)  # as /tmp: nobody may replace another's file
    refuse_links(shared / "tokens.jsonl")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, STRANGER, STRANGER)
    with pytest.raises(BulkInputError, match=rf"belongs to another user \(uid {STRANGER}, not 0\); write the tokens"):
        refuse_links(theirs / "tokens.jsonl")


def test_the_file_itself_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokens.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BulkInputError, match="is a symbolic link; the tool writes tokens only to a file of its own"):
        refuse_links(tmp_path / "tokens.jsonl")


def as_nobody(call: Callable[[], object]) -> str:
    """The one-line error ``call`` raises in a child process run as uid 65534 (when this is root)."""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            call()
        except (BulkInputError, ConfigError) as exc:
            os.write(writing, str(exc).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as said:
        text = said.read().decode()
    os.waitpid(child, 0)
    return text


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's own are its user's alone)."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


def test_an_output_this_user_may_not_write_is_one_line_saying_how(open_dir: Path) -> None:
    """As `docker run IMAGE bulk ... -o tokens.jsonl` in the image's / : the path, the uid, what to do."""
    tmp_path = open_dir
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o555)
    said = as_nobody(lambda: os.close(open_private(closed / "tokens.jsonl", os.O_WRONLY | os.O_CREAT)))
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert said == (
        f"{closed / 'tokens.jsonl'}: cannot be written (Permission denied) by this process (uid {uid}); "
        "write the tokens to a directory this user owns (in a container: mount one, run as its owner with --user, "
        "and work in it with -w)"
    )


def test_a_key_file_this_user_may_not_read_is_one_line_saying_how(open_dir: Path) -> None:
    """As a real key (mode 0600) mounted into the image, whose user is another: the uid and the fix."""
    tmp_path = open_dir
    key = tmp_path / "clerk-key"
    key.write_text("sk_live_" + "k" * 32)
    key.chmod(0o600)
    if os.geteuid() != 0:
        pytest.skip("giving the file to another user needs root")
    said = as_nobody(lambda: read_key_file(str(key)))
    uid = NOBODY
    assert said == (
        f"CLERK_SECRET_KEY_FILE: cannot read {key}: Permission denied (this process runs as uid {uid}: "
        f"give it the file, e.g. chown {uid} FILE && chmod 0400 FILE)"
    )
