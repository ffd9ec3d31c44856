"""The SQLite board: shared by processes, WAL, and unavailable when it cannot write."""

import functools
import multiprocessing
import os
import sqlite3
import time

import pytest

from app.routing import board as shared
from app.routing.board import BoardUnavailable, GuardedBoard, Slate
from app.routing.board_sqlite import SqliteBoard

NOW = time.time()


def tripped(slate):
    return Slate(failures=2, failures_until=NOW + 600, tripped=True, tripped_until=NOW - 1)


def _claim_in_child(path, owner, start, results):
    board = SqliteBoard(path)
    start.wait(10)
    slate = board.update("ollama", functools.partial(shared.claimed, now=time.time(),
                                                     lease=30, owner=owner))
    results.put((owner, slate.trial_owner))
    board.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "board.sqlite3")


def test_one_process_of_many_wins_the_trial(path):
    SqliteBoard(path).update("ollama", tripped)
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    children = [context.Process(target=_claim_in_child, args=(path, f"w{i}", start, results))
                for i in range(4)]
    for child in children:
        child.start()
    start.set()
    outcomes = [results.get(timeout=20) for _ in children]
    for child in children:
        child.join(timeout=10)
    winners = {won for _, won in outcomes}
    assert len(winners) == 1  # every process saw the same single owner
    assert winners <= {owner for owner, _ in outcomes}


def test_a_second_process_reads_what_the_first_wrote(path):
    SqliteBoard(path).update("groq", functools.partial(
        shared.cooled, until=NOW + 7, error="rate-limited"))
    other = SqliteBoard(path)
    assert other.read(["groq"])["groq"].cooldown_until == NOW + 7


def test_file_uses_wal(path):
    SqliteBoard(path).check()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_directory_is_unavailable_not_a_crash(tmp_path):
    board = SqliteBoard(str(tmp_path / "gone" / "board.sqlite3"))
    with pytest.raises(BoardUnavailable):
        board.read(["ollama"])
    with pytest.raises(BoardUnavailable):
        board.check()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_unwritable_file_is_unavailable(path):
    SqliteBoard(path).check()
    os.chmod(path, 0o444)
    with pytest.raises(BoardUnavailable):
        SqliteBoard(path).update("ollama", tripped)


def test_locked_file_gives_up_after_its_busy_timeout(path):
    board = SqliteBoard(path, timeout=0.05)
    board.check()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process stuck mid-write
    try:
        started = time.monotonic()
        with pytest.raises(BoardUnavailable):
            board.update("ollama", tripped)
        assert time.monotonic() - started < 2.0  # generous: the timeout is 50 ms
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert board.update("ollama", tripped).tripped  # and it works again afterwards


def test_guarded_board_comes_back_when_the_file_can_be_written(tmp_path, clock):
    directory = tmp_path / "run"
    guard = GuardedBoard(SqliteBoard(str(directory / "board.sqlite3")), clock=clock)
    assert guard.read(["ollama"]) is None
    assert guard.up is False
    directory.mkdir()
    clock.advance(shared.RETRY_FIRST)
    assert guard.reconnect() is True
    assert guard.read(["ollama"]) == {}
