"""Quotas: the board's counters (every backend), windows, limits, the per-worker share."""

import threading
import time

import pytest

from app import errors
from app.callers import Caller
from app.prices import parse_prices
from app.quotas import Quotas, Tab, counter_key, window_ends
from app.routing.aliases import Entry
from app.routing.board import BoardUnavailable, GuardedBoard, MemoryBoard
from app.routing.board_sqlite import SqliteBoard
from tests import redis_server

WALL0 = 1_800_000_000.0 + 30  # 30 s into a minute


class Wall:
    def __init__(self, now=WALL0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request, tmp_path):
    if request.param == "memory":
        yield MemoryBoard()
    elif request.param == "sqlite":
        board = SqliteBoard(str(tmp_path / "board.sqlite3"))
        yield board
        board.close()
    else:
        redis_server.require()
        from app.routing.board_redis import RedisBoard

        server = redis_server.RedisServer().start()
        board = RedisBoard(server.url, "test:")
        board.server = server
        yield board
        board.close()
        server.stop()


# --- the counter op, the same on every backend -----------------------------------------------

def test_add_returns_running_totals_and_zero_reads(backend):
    until = time.time() + 60
    assert backend.add({"a": (1, until), "b": (5, until)}) == {"a": 1, "b": 5}
    assert backend.add({"a": (2, until), "b": (0, until)}) == {"a": 3, "b": 5}
    assert backend.add({"c": (0, until)}) == {"c": 0}
    assert backend.add({"a": (-1, until)}) == {"a": 2}


def test_adds_from_many_threads_all_count(backend):
    until = time.time() + 60

    def bump():
        for _ in range(25):
            backend.add({"n": (1, until)})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert backend.add({"n": (0, until)}) == {"n": 100}


def test_memory_counters_expire_with_their_window():
    wall = Wall()
    board = MemoryBoard(wall=wall)
    board.add({"a": (3, WALL0 + 1)})
    wall.now += 2
    assert board.add({"a": (0, WALL0 + 61)}) == {"a": 0}


def test_every_redis_counter_has_a_ttl(backend):
    if backend.name != "redis":
        pytest.skip("redis only")
    import redis

    backend.add({"a": (1, time.time() + 60), "b": (0, time.time() + 86400)})
    client = redis.Redis.from_url(backend.server.url, decode_responses=True)
    keys = client.keys("*")
    assert sorted(keys) == ["test:count:a", "test:count:b"]
    assert all(0 < client.ttl(key) <= 86401 for key in keys)
    client.close()


# --- windows and limits ---------------------------------------------------------------------

def test_windows_are_the_utc_minute_and_day():
    ends = window_ends(WALL0)
    assert ends["minute"][1] - WALL0 == 30
    assert ends["day"][1] % 86400 == 0 and 0 < ends["day"][1] - WALL0 <= 86400


def quotas(board=None, workers=1, wall=None):
    guarded = GuardedBoard(board) if board is not None else None
    return Quotas(guarded, workers=workers, wall=wall or Wall())


def test_the_61st_request_of_60_per_minute_is_refused_until_the_minute_ends():
    wall = Wall()
    q = quotas(MemoryBoard(wall=wall), wall=wall)
    caller = Caller("api", limits={"requests_per_minute": 60})
    for _ in range(60):
        assert q.admit(caller) is True
    with pytest.raises(errors.QuotaExceeded) as raised:
        q.admit(caller)
    error = raised.value
    assert error.status == 429 and error.kind == "rate_limit"
    assert error.headers() == {"x-should-retry": "true", "Retry-After": "30"}
    assert error.body()["detail"]["reason"] == "quota"
    assert error.body()["detail"]["limit"] == "requests_per_minute"
    # The refused request is not counted; the next minute starts afresh.
    assert q.usage([caller])[0]["minute"]["requests"] == 60
    wall.now += 30
    assert q.admit(caller) is True


def test_token_limits_refuse_once_reached_with_the_window_that_frees():
    wall = Wall()
    q = quotas(MemoryBoard(wall=wall), wall=wall)
    caller = Caller("api", limits={"tokens_per_minute": 100, "tokens_per_day": 150})
    q.admit(caller)
    q.settle("api", True, 100)
    q.flush()
    with pytest.raises(errors.QuotaExceeded) as raised:
        q.admit(caller)
    assert raised.value.limit == "tokens_per_minute"
    wall.now += 31
    q.admit(caller)
    q.settle("api", True, 50)
    q.flush()
    with pytest.raises(errors.QuotaExceeded) as raised:
        q.admit(caller)
    assert raised.value.limit == "tokens_per_day"
    assert int(raised.value.headers()["Retry-After"]) > 60


def test_a_caller_without_limits_touches_no_board_when_admitted():
    class Counting(MemoryBoard):
        calls = 0

        def add(self, counts):
            Counting.calls += 1
            return super().add(counts)

    q = quotas(Counting())
    assert q.admit(Caller("free")) is False
    q.settle("free", False, 12)
    q.settle("free", False, 8)
    assert Counting.calls == 0  # settled in the worker, flushed in the background
    q.flush()
    assert Counting.calls == 1  # one op for everything pending
    q.settle("free", False, 0)
    assert q.usage([Caller("free")])[0]["minute"] == {"requests": 3, "tokens": 20,
                                                      "resets_in": 30}


def test_with_limits_admission_is_one_board_op():
    class Counting(MemoryBoard):
        calls = 0

        def add(self, counts):
            Counting.calls += 1
            return super().add(counts)

    q = quotas(Counting())
    q.admit(Caller("api", limits={"requests_per_minute": 5, "tokens_per_day": 9}))
    assert Counting.calls == 1


class DownBoard(MemoryBoard):
    def add(self, counts):
        raise BoardUnavailable("down")

    def check(self):
        raise BoardUnavailable("down")


def test_a_board_that_is_down_never_blocks_and_each_worker_takes_an_equal_share():
    q = quotas(DownBoard(), workers=2)
    caller = Caller("api", limits={"requests_per_minute": 60})
    for _ in range(30):
        q.admit(caller)
    with pytest.raises(errors.QuotaExceeded):
        q.admit(caller)
    assert q.usage([caller])[0]["shared"] is False


class BlinkingBoard(MemoryBoard):
    """A board that is down while ``down`` is set (Redis killed, then started again)."""

    down = False

    def add(self, counts):
        if self.down:
            raise BoardUnavailable("down")
        return super().add(counts)

    def check(self):
        if self.down:
            raise BoardUnavailable("down")


def test_quotas_go_back_to_the_board_when_it_returns(clock):
    board = BlinkingBoard()
    q = Quotas(GuardedBoard(board, clock=clock), workers=2, wall=Wall())
    caller = Caller("api", limits={"requests_per_minute": 60})
    board.down = True
    q.admit(caller)
    assert q.usage([caller])[0]["shared"] is False
    board.down = False
    clock.advance(10)   # past the guard's retry
    q.admit(caller)
    assert q.usage([caller])[0]["shared"] is True


def test_the_share_is_at_least_one():
    q = quotas(None, workers=4)
    caller = Caller("api", limits={"requests_per_minute": 2})
    q.admit(caller)
    with pytest.raises(errors.QuotaExceeded):
        q.admit(caller)


def test_two_workers_on_one_board_share_the_whole_limit():
    wall = Wall()
    board = MemoryBoard(wall=wall)
    one, two = quotas(board, workers=2, wall=wall), quotas(board, workers=2, wall=wall)
    caller = Caller("api", limits={"requests_per_minute": 4})
    for q in (one, two, one, two):
        q.admit(caller)
    for q in (one, two):
        with pytest.raises(errors.QuotaExceeded):
            q.admit(caller)


# --- a request's tab ------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.spent = []

    def caller_tokens(self, *args):
        self.spent.append(args)


def test_a_tab_charges_tokens_at_their_price_and_settles_on_close():
    q = quotas(MemoryBoard(wall=Wall()))
    prices = parse_prices({"models": {"groq/m": {"prompt": 1, "completion": 2}}})
    recorder = Recorder()
    tab = Tab(Caller("api"), q, recorder, prices)
    tab.admit("groq/m")
    tab.spend(Entry("groq", "m"), 10, 5)
    assert recorder.spent == [("api", "groq", 10, 5, pytest.approx(20 / 1e6))]
    tab.close()
    assert q.usage([Caller("api")])[0]["minute"]["tokens"] == 15


def test_a_tab_refuses_a_model_outside_the_globs_before_counting():
    q = quotas(MemoryBoard(wall=Wall()))
    caller = Caller("api", models=("mana/*",), limits={"requests_per_minute": 1})
    tab = Tab(caller, q, Recorder(), parse_prices({}))
    with pytest.raises(errors.Forbidden):
        tab.admit("openai/gpt-4o")
    tab.close()
    assert q.usage([caller])[0]["minute"]["requests"] == 0


def test_the_background_flush_puts_pending_counts_on_the_board(monkeypatch):
    from app import quotas as module

    monkeypatch.setattr(module, "FLUSH_EVERY", 0.01)
    board = MemoryBoard(wall=Wall())
    q = quotas(board)
    q.settle("free", False, 5)
    until = window_ends(WALL0)["minute"]
    key = counter_key("free", "minute", until[0], "tokens")
    deadline = time.monotonic() + 5
    while board.add({key: (0, until[1])})[key] != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert board.add({key: (0, until[1])})[key] == 5


def test_key_names_carry_caller_window_and_index():
    assert counter_key("api", "minute", 7, "tokens") == "api:minute:7:tokens"
