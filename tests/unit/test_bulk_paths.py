"""Where the bulk tool agrees to write tokens: never where another user could redirect them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.bulk import BulkInputError, refuse_links

STRANGER = 54321


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
    with pytest.raises(BulkInputError, match="others can write in"):
        refuse_links(theirs / "tokens.jsonl")


def test_the_file_itself_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokens.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BulkInputError, match="is a symbolic link; the tool writes tokens only to a file of its own"):
        refuse_links(tmp_path / "tokens.jsonl")
