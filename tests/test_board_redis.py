"""The Redis board against a real redis-server: TTLs, prefixes, and a dead or hung server."""

import functools
import os
import signal
import threading
import time

import pytest

from app.routing import board as shared
from app.routing.board import BoardUnavailable, GuardedBoard, Slate
from tests import redis_server as servers
from tests.redis_server import redis_server  # noqa: F401  (a fixture)

redis = pytest.importorskip("redis")


def fail(slate, threshold=2):
    return shared.failed(slate, now=time.time(), error="boom", threshold=threshold,
                         backoff=60, window=600)


@pytest.fixture
def board(redis_server):  # noqa: F811
    from app.routing.board_redis import RedisBoard

    board = RedisBoard(redis_server.url, "test:")
    yield board
    board.close()


@pytest.fixture
def client(redis_server):  # noqa: F811
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def test_every_key_is_under_the_prefix_and_has_a_ttl(board, client):
    board.update("ollama", fail)
    board.update("groq", functools.partial(shared.cooled, until=time.time() + 5, error="429"))
    keys = client.keys("*")
    assert sorted(keys) == ["test:provider:groq", "test:provider:ollama"]
    for key in keys:
        # An hour past the slate's last deadline: the failure window (600 s) for ollama.
        assert 0 < client.pttl(key) <= (600 + shared.KEEP) * 1000


def test_prefixes_keep_boards_apart(board, redis_server):  # noqa: F811
    from app.routing.board_redis import RedisBoard

    other = RedisBoard(redis_server.url, "other:")
    board.update("ollama", fail)
    assert other.read(["ollama"]) == {}
    other.close()


def test_cleared_slate_deletes_its_key(board, client):
    board.update("ollama", fail)
    board.update("ollama", shared.cleared)
    assert client.keys("*") == []


def test_two_clients_elect_one_trial(board, redis_server):  # noqa: F811
    from app.routing.board_redis import RedisBoard

    board.update("ollama", lambda _: Slate(tripped=True, tripped_until=time.time() - 1,
                                           failures=2, failures_until=time.time() + 600))
    boards = [RedisBoard(redis_server.url, "test:") for _ in range(8)]
    start = threading.Barrier(len(boards))
    owners = []

    def claim(index):
        start.wait(5)
        slate = boards[index].update("ollama", functools.partial(
            shared.claimed, now=time.time(), lease=30, owner=f"w{index}"))
        owners.append(slate.trial_owner)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(boards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(owners) == len(boards) and len(set(owners)) == 1
    for other in boards:
        other.close()


def test_dead_server_is_unavailable_at_once(board, redis_server):  # noqa: F811
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(BoardUnavailable):
        board.update("ollama", fail)
    with pytest.raises(BoardUnavailable):
        board.check()
    assert time.monotonic() - started < 2.0  # generous: refused at once, 0.1 s timeouts


def test_same_client_works_again_after_a_restart(board, redis_server):  # noqa: F811
    board.update("ollama", fail)
    redis_server.kill()
    with pytest.raises(BoardUnavailable):
        board.check()
    redis_server.start()
    board.check()
    assert board.read(["ollama"]) == {}  # no persistence: a restarted Redis knows nothing
    assert board.update("ollama", fail).failures == 1


def test_hung_server_costs_a_call_its_timeout_then_the_guard_skips_it(redis_server):  # noqa
    from app.routing.board_redis import RedisBoard

    guard = GuardedBoard(RedisBoard(redis_server.url, "test:", timeout=0.1))
    assert guard.read(["ollama"]) == {}
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert guard.update("ollama", fail) is None
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(100):
            assert guard.update("ollama", fail) is None
        skipped = time.monotonic() - started
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert guard.up is False
    assert first < 2.0      # generous: one 0.1 s timeout, no client retries
    assert skipped < 1.0    # 100 calls that never waited on the hung server
    guard.backend.close()


def test_missing_redis_server_skips_cleanly(monkeypatch):
    monkeypatch.setattr(servers, "REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(pytest.skip.Exception):
        servers.require()
