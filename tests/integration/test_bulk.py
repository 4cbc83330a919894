"""The bulk tool: a file in, a file of tokens out; bad rows, a restarted worker, a killed tool, a rerun."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
from pathlib import Path

from service.callers.bulk import reply_queue_name
from service.local.fake_clerk import FakeClerk
from tests.conftest import wait_until
from tests.ledger import Ledger
from tests.workers import WorkerProcesses


def lines(path: Path) -> list[dict[str, object]]:
    """The output's complete lines."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


async def finish(worker_processes: WorkerProcesses, *args: str, timeout: float = 120, **env: str) -> tuple[int, str]:  # noqa: ASYNC109
    """Run the tool to its end (with more environment); its exit code and what it wrote."""
    tool = worker_processes.spawn("bulk", *args, "--no-progress", **env)
    code = await asyncio.to_thread(tool.process.wait, timeout)
    return code, tool.log_path.read_text()


async def test_a_file_with_bad_rows_is_answered_row_by_row_and_a_rerun_sends_nothing(
    worker_processes: WorkerProcesses, fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    """Bad rows are reported by line and written as failed; failures go to a file to feed back; output is 0600."""
    source = tmp_path / "users.csv"
    source.write_text(
        "user_id,expires_in_seconds,org_id\n"
        "user_a,600,\n"
        ",600,\n"  # line 3: no user_id
        "user_b,soon,\n"  # line 4: not a number
        "stranger,,\n"  # line 5: Clerk does not know them
        "user_c,,org_1\n"
        "user_a,600,\n",  # line 7: the same row again: its own message id, its own token
        encoding="utf-8",
    )
    output = tmp_path / "tokens.jsonl"
    await worker_processes.start()
    code, said = await finish(worker_processes, str(source), "-o", str(output))
    assert code == 0, said
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    by_line = {entry["line"]: entry for entry in lines(output)}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert [by_line[n]["outcome"] for n in (2, 6, 7)] == ["created"] * 3
    assert by_line[2]["sign_in_token"]["id"] != by_line[7]["sign_in_token"]["id"]  # type: ignore[index]
    assert by_line[3]["error"] == {"code": "invalid_request", "message": "line 3: no user_id"}
    assert "line 4: expires_in_seconds 'soon' is not a whole number" in by_line[4]["error"]["message"]  # type: ignore[index]
    assert by_line[5]["error"]["code"] == "user_not_found"  # type: ignore[index]
    assert "6 rows: 3 created, 3 failed" in said
    assert '"line": 3' in said.replace('"line":3', '"line": 3')
    failures = output.with_name("tokens.jsonl.failed.csv")
    assert failures.read_text() == "user_id,expires_in_seconds,org_id\nstranger,,\n"
    assert stat.S_IMODE(failures.stat().st_mode) == 0o600
    # A rerun finds every row answered: nothing is sent.
    calls = fake_clerk.stats.create_calls
    code, said = await finish(worker_processes, str(source), "-o", str(output))
    assert (code, fake_clerk.stats.create_calls, len(lines(output))) == (0, calls, 6)


async def test_ten_thousand_rows_survive_a_worker_restart_and_a_killed_tool(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    tmp_path: Path,
    redis_url: str,
    amqp: object,
    token_ledger: Ledger,
) -> None:
    """A worker killed mid-run, then the tool killed and rerun: every row answered once, one token a user."""
    rows = 10_000
    source = tmp_path / "users.jsonl"
    source.write_text("".join(json.dumps({"user_id": f"user_{i}"}) + "\n" for i in range(rows)), encoding="utf-8")
    output = tmp_path / "tokens.jsonl"
    # Workers share the idempotency store in Redis: a request redelivered to the next worker gets its token.
    first = await worker_processes.start(REDIS_URL=redis_url)
    tool = worker_processes.spawn("bulk", str(source), "-o", str(output), "--no-progress", "--max-outstanding", "500")
    await wait_until(lambda: len(lines(output)) >= 2_000, timeout=60, what="2,000 rows answered")
    await worker_processes.stop(first, signal.SIGKILL)
    await worker_processes.start(REDIS_URL=redis_url)
    await wait_until(lambda: len(lines(output)) >= 5_000, timeout=60, what="5,000 rows answered")
    await worker_processes.stop(tool, signal.SIGKILL)
    code, said = await finish(worker_processes, str(source), "-o", str(output), "--max-outstanding", "500")
    assert code == 0, said
    answered = lines(output)
    assert len(answered) == rows
    assert sorted(entry["user_id"] for entry in answered) == sorted(f"user_{i}" for i in range(rows))  # type: ignore[type-var]
    assert all(entry["outcome"] == "created" for entry in answered)
    # One token a row in the output, each made for its user. A worker killed while its calls were
    # at Clerk leaves those tokens unanswered (nobody holds them); the next worker makes new ones:
    # at most what one worker had in flight (both lanes' PREFETCH), never for a row already answered.
    delivered = {e["sign_in_token"]["id"]: e["user_id"] for e in answered}  # type: ignore[index]
    assert len(delivered) == rows
    assert all(fake_clerk.stats.tokens[token]["user_id"] == user for token, user in delivered.items())
    orphans = sum(fake_clerk.stats.created_per_user.values()) - rows
    assert 0 <= orphans <= 2 * 200
    for token, user in delivered.items():
        token_ledger.delivered(token, "bulk-tool", user)
    await token_ledger.balanced(cut=2 * 200)
    assert f"{rows} rows: {rows} created, 0 failed" in said
    # The reply queue is gone once every row is answered.
    channel = await amqp.channel()  # type: ignore[attr-defined]
    underlay = await channel.get_underlay_channel()
    import aiormq  # noqa: PLC0415

    try:
        await underlay.queue_declare(reply_queue_name(output, "guest"), passive=True)
        raise AssertionError("the reply queue is still there")
    except aiormq.exceptions.ChannelNotFoundEntity:
        pass


async def test_a_file_that_is_not_rows_is_one_line_and_exit_2(
    worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    """Not UTF-8, or a CSV without a user_id column: nothing sent, one line naming the file."""
    not_text = tmp_path / "binary.csv"
    not_text.write_bytes(b"user_id\n\xff\xfe\n")
    no_column = tmp_path / "emails.csv"
    no_column.write_text("email\na@example.com\n")
    for source, says in ((not_text, "not UTF-8 text"), (no_column, "must be a header naming a user_id column")):
        code, said = await finish(worker_processes, str(source), "-o", str(tmp_path / "out.jsonl"))
        assert code == 2
        assert said.strip().count("\n") == 0, said
        assert str(source) in said
        assert says in said
