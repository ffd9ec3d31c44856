"""The shared board: its transitions, every backend's contract, and caches sharing one.

Two ``HealthCache`` objects on one board stand for two workers: each has
its own monotonic clock (they differ between processes), both read the
same wall clock, and the tests step them instead of sleeping.
"""

import functools
import threading

import pytest

from app.config import ConfigError, build_config, secrets
from app.routing import board as shared
from app.routing.board import GuardedBoard, MemoryBoard, Slate
from app.routing.board_sqlite import SqliteBoard
from app.routing.breaker import HealthCache
from tests import redis_server

WALL0 = 1_700_000_000.0
THRESHOLD = 2
BACKOFF = 60.0


# --- transitions -------------------------------------------------------------------------------

def fail(slate, now=WALL0, threshold=THRESHOLD):
    return shared.failed(slate, now=now, error="boom", threshold=threshold, backoff=BACKOFF,
                         window=600)


def test_failures_count_up_to_a_trip():
    once = fail(Slate())
    assert (once.failures, once.tripped) == (1, False)
    twice = fail(once, now=WALL0 + 1)
    assert (twice.failures, twice.tripped, twice.tripped_until) == (2, True, WALL0 + 1 + BACKOFF)


def test_failure_count_expires_after_its_window():
    once = fail(Slate())
    assert fail(once, now=WALL0 + 601).failures == 1


def test_failure_while_tripped_never_shortens_the_backoff():
    tripped = fail(fail(Slate()), now=WALL0 + 30)
    again = shared.failed(tripped, now=WALL0 + 31, error="x", threshold=THRESHOLD,
                          backoff=1, window=600)
    assert again.tripped_until == tripped.tripped_until


def test_trial_is_claimed_once_and_only_after_the_backoff():
    tripped = fail(fail(Slate()))
    early = shared.claimed(tripped, now=WALL0 + 1, lease=5, owner="a")
    assert early.trial_owner == ""
    first = shared.claimed(tripped, now=WALL0 + BACKOFF, lease=5, owner="a")
    second = shared.claimed(first, now=WALL0 + BACKOFF + 1, lease=5, owner="b")
    assert (first.trial_owner, second.trial_owner) == ("a", "a")
    expired = shared.claimed(first, now=WALL0 + BACKOFF + 5, lease=5, owner="b")
    assert expired.trial_owner == "b"


def test_only_the_owner_releases_a_trial():
    held = shared.claimed(fail(fail(Slate())), now=WALL0 + BACKOFF, lease=5, owner="a")
    assert shared.released(held, owner="b") == held
    assert shared.released(held, owner="a").trial_owner == ""


def test_probe_ok_ends_the_backoff_but_not_the_trip():
    tripped = fail(fail(Slate()))
    probed = shared.probed_ok(tripped, now=WALL0 + 3, backoff=BACKOFF)
    assert (probed.tripped, probed.tripped_until) == (True, WALL0 + 3)


def test_probe_ok_cuts_a_backoff_once_until_a_probe_fails():
    probed = shared.probed_ok(fail(fail(Slate())), now=WALL0 + 3, backoff=BACKOFF)
    rearmed = fail(probed, now=WALL0 + 4)            # the trial failed
    assert shared.probed_ok(rearmed, now=WALL0 + 7, backoff=BACKOFF) == rearmed
    dark = shared.failed(rearmed, now=WALL0 + 8, error="probe", threshold=THRESHOLD,
                         backoff=BACKOFF, window=600, probe=True)
    assert shared.probed_ok(dark, now=WALL0 + 9, backoff=BACKOFF).tripped_until == WALL0 + 9


def test_probe_ok_past_the_backoff_clears_unless_a_trial_is_out():
    tripped = fail(fail(Slate()))
    assert shared.probed_ok(tripped, now=WALL0 + BACKOFF, backoff=BACKOFF) == Slate()
    held = shared.claimed(tripped, now=WALL0 + BACKOFF, lease=5, owner="a")
    assert shared.probed_ok(held, now=WALL0 + BACKOFF + 1, backoff=BACKOFF) == held


def test_probe_right_after_a_cut_short_backoff_leaves_the_trial_to_a_call():
    probed = shared.probed_ok(fail(fail(Slate())), now=WALL0 + 3, backoff=BACKOFF)
    assert shared.probed_ok(probed, now=WALL0 + 5, backoff=BACKOFF) == probed
    idle = shared.probed_ok(probed, now=WALL0 + 3 + BACKOFF, backoff=BACKOFF)
    assert idle == Slate()  # a whole backoff without a call: the probe is the trial


def test_cleared_keeps_a_running_cooldown_only():
    cooled = shared.cooled(fail(fail(Slate())), until=WALL0 + 9, error="429")
    assert shared.cleared(cooled) == Slate(cooldown_until=WALL0 + 9)


# --- every backend keeps the same contract --------------------------------------------------

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
        board = RedisBoard(server.url, "test:", wall=lambda: WALL0)
        yield board
        board.close()
        server.stop()


def test_unknown_provider_reads_as_nothing(backend):
    assert backend.read(["ollama"]) == {}


def test_update_applies_the_change_and_reads_it_back(backend):
    after = backend.update("ollama", fail)
    assert after.failures == 1
    assert backend.read(["ollama", "groq"]) == {"ollama": after}


def test_update_round_trips_every_field(backend):
    slate = Slate(failures=3, failures_until=WALL0 + 1.5, tripped=True,
                  tripped_until=WALL0 + 60.25, cooldown_until=WALL0 + 7.125,
                  trial_until=WALL0 + 70.5, trial_owner="123-abc", last_error="HTTP 500: ü",
                  probe_spent=True)
    backend.update("groq", lambda _: slate)
    assert backend.read(["groq"]) == {"groq": slate}


def test_clearing_a_slate_removes_it(backend):
    backend.update("ollama", fail)
    backend.update("ollama", shared.cleared)
    assert backend.read(["ollama"]) == {}


def test_concurrent_failures_are_all_counted(backend):
    threads = [threading.Thread(target=backend.update, args=("ollama", functools.partial(
        fail, threshold=100))) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert backend.read(["ollama"])["ollama"].failures == 10


def test_check_passes_on_a_working_board(backend):
    backend.check()


# --- the breaker in front of the board -------------------------------------------------------

class FlakyBoard(MemoryBoard):
    """A memory board that can be told to fail like a dead Redis."""

    name = "flaky"

    def __init__(self):
        super().__init__()
        self.broken = False
        self.calls = 0

    def _maybe_fail(self):
        self.calls += 1
        if self.broken:
            raise shared.BoardUnavailable("connection refused")

    def read(self, providers):
        self._maybe_fail()
        return super().read(providers)

    def update(self, provider, change):
        self._maybe_fail()
        return super().update(provider, change)

    def check(self):
        self._maybe_fail()


def test_guard_skips_a_failed_board_until_check_passes(clock):
    flaky = FlakyBoard()
    guard = GuardedBoard(flaky, clock=clock)
    states = []
    guard.subscribe(states.append)
    flaky.broken = True
    assert guard.update("ollama", fail) is None
    calls = flaky.calls
    assert guard.update("ollama", fail) is None and guard.read(["ollama"]) is None
    assert flaky.calls == calls  # skipped, not tried: a request never waits on it
    assert guard.reconnect() is False  # retry not due yet
    clock.advance(shared.RETRY_FIRST)
    assert guard.reconnect() is False  # due, tried, still down
    flaky.broken = False
    clock.advance(shared.RETRY_FIRST * 2)
    assert guard.reconnect() is True
    assert guard.update("ollama", fail).failures == 1
    assert states == [False, True]


def test_busy_board_costs_one_call_and_stays_up(clock):
    flaky = FlakyBoard()
    guard = GuardedBoard(flaky, clock=clock)

    def contended(slate):
        raise shared.BoardBusy("kept changing")

    assert guard.update("ollama", contended) is None
    assert guard.up is True
    assert guard.update("ollama", fail).failures == 1


def test_guard_retry_gap_grows_to_its_cap(clock):
    flaky = FlakyBoard()
    guard = GuardedBoard(flaky, clock=clock)
    flaky.broken = True
    guard.read(["x"])
    for _ in range(10):
        clock.advance(shared.RETRY_MAX)
        guard.reconnect()
    calls = flaky.calls
    clock.advance(shared.RETRY_MAX - 0.01)
    guard.reconnect()
    assert flaky.calls == calls
    clock.advance(0.01)
    guard.reconnect()
    assert flaky.calls == calls + 1


# --- two workers' caches on one board --------------------------------------------------------

class Worker:
    """One worker's cache: its own monotonic clock, the shared wall clock."""

    def __init__(self, board, clock, offset, **kw):
        self.clock = lambda: clock.now + offset
        kw.setdefault("threshold", THRESHOLD)
        kw.setdefault("backoff", BACKOFF)
        self.cache = HealthCache(["ollama", "groq"], clock=self.clock,
                                 wall=lambda: WALL0 + clock.now, board=board, **kw)
        self.events = []
        self.cache.subscribe(lambda provider, healthy: self.events.append((provider, healthy)))


@pytest.fixture
def board(clock):
    return GuardedBoard(FlakyBoard(), clock=clock)


@pytest.fixture
def pair(board, clock):
    return Worker(board, clock, 0.0), Worker(board, clock, 5000.0)


def test_failures_of_two_workers_add_up_to_one_trip(pair):
    a, b = pair
    a.cache.record_failure("ollama", "refused")
    assert a.cache.admit("ollama") is True
    b.cache.record_failure("ollama", "refused")
    assert b.cache.admit("ollama") is False
    a.cache.sync()
    assert a.cache.admit("ollama") is False
    assert a.events == b.events == [("ollama", False)]


def test_a_trip_reaches_the_other_worker_on_its_next_sync(pair):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    assert b.cache.admit("ollama") is True  # not synced yet: the hot path asks no one
    b.cache.sync()
    assert b.cache.admit("ollama") is False
    assert b.cache.snapshot()["ollama"]["status"] == "unhealthy"


def test_new_worker_starts_from_the_board(board, clock, pair):
    a, _ = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    newcomer = Worker(board, clock, 300.0)
    newcomer.cache.start(interval=3600)
    try:
        assert newcomer.cache.admit("ollama") is False
        assert newcomer.cache.retry_after("ollama") == pytest.approx(BACKOFF)
    finally:
        newcomer.cache._stop.set()


def test_half_open_trial_is_elected_once_per_board(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(BACKOFF)
    assert [a.cache.admit("ollama"), b.cache.admit("ollama"),
            a.cache.admit("ollama"), b.cache.admit("ollama")] == [True, False, False, False]


def test_trial_success_in_one_worker_reopens_the_other(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(BACKOFF)
    assert a.cache.admit("ollama") is True
    a.cache.record_success("ollama")
    b.cache.sync()
    assert [b.cache.admit("ollama") for _ in range(3)] == [True, True, True]
    assert b.events == [("ollama", False), ("ollama", True)]


def test_trial_failure_rearms_the_backoff_for_both(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    clock.advance(BACKOFF)
    assert b.cache.admit("ollama") is True  # b never synced: its election asks the board
    b.cache.record_failure("ollama", "still refused")
    a.cache.sync()
    clock.advance(BACKOFF - 0.01)
    assert (a.cache.admit("ollama"), b.cache.admit("ollama")) == (False, False)


def test_released_trial_lets_another_worker_be_the_trial(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(BACKOFF)
    assert a.cache.admit("ollama") is True
    assert b.cache.admit("ollama") is False
    a.cache.release("ollama")
    b.cache.sync()
    assert b.cache.admit("ollama") is True


def test_probe_ok_in_one_worker_makes_the_next_call_anywhere_the_trial(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(3)
    b.cache.record_probe_ok("ollama")
    a.cache.sync()
    assert [a.cache.admit("ollama"), b.cache.admit("ollama")] == [True, False]


def test_probe_shortcut_is_spent_for_the_whole_board(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    a.cache.record_probe_ok("ollama")
    assert a.cache.admit("ollama") is True
    a.cache.record_failure("ollama", "the trial failed too")
    b.cache.sync()
    clock.advance(3)
    b.cache.record_probe_ok("ollama")  # b's probe answers as well: no second shortcut
    a.cache.sync()
    assert (a.cache.admit("ollama"), b.cache.admit("ollama")) == (False, False)


def test_second_workers_probe_does_not_close_what_the_first_cut_short(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(3)
    a.cache.record_probe_ok("ollama")
    b.cache.sync()
    clock.advance(1.5)
    b.cache.record_probe_ok("ollama")
    a.cache.sync()
    assert [a.cache.admit("ollama"), b.cache.admit("ollama"), a.cache.admit("ollama")] \
        == [True, False, False]


def test_probe_after_the_backoff_reopens_every_worker(pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    clock.advance(BACKOFF)
    b.cache.record_probe_ok("ollama")  # no traffic at all: the probe is the trial
    a.cache.sync()
    assert [a.cache.admit("ollama") for _ in range(3)] == [True, True, True]
    assert a.events == [("ollama", False), ("ollama", True)]


def test_cooldown_is_shared(pair, clock):
    a, b = pair
    a.cache.record_rate_limit("groq", 7)
    b.cache.sync()
    assert b.cache.admit("groq") is False
    assert b.cache.retry_after("groq") == pytest.approx(7)
    clock.advance(7)
    assert b.cache.admit("groq") is True
    assert b.cache.snapshot()["groq"]["consecutive_failures"] == 0


def test_success_clears_a_failure_another_worker_counted(pair):
    a, b = pair
    a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    b.cache.record_success("ollama")
    a.cache.sync()
    a.cache.record_failure("ollama", "refused")
    assert a.cache.admit("ollama") is True


def test_healthy_calls_never_touch_the_board(board, pair):
    a, _ = pair
    calls = board.backend.calls
    for _ in range(100):
        assert a.cache.admit("ollama") is True
        a.cache.record_success("ollama")
        a.cache.release("ollama")
    assert board.backend.calls == calls


def test_sync_never_undoes_a_change_made_while_it_read(board, pair):
    a, _ = pair
    real_read = board.backend.read

    def read_then_fail_meanwhile(providers):
        slates = real_read(providers)  # the board before the trip
        for _ in range(THRESHOLD):
            a.cache.record_failure("ollama", "refused")
        return slates

    board.backend.read = read_then_fail_meanwhile
    a.cache.sync()
    assert a.cache.admit("ollama") is False


def test_dead_board_falls_back_to_each_workers_own_cache(board, pair):
    a, b = pair
    board.backend.broken = True
    a.cache.record_failure("ollama", "refused")
    b.cache.record_failure("ollama", "refused")
    assert (a.cache.admit("ollama"), b.cache.admit("ollama")) == (True, True)
    a.cache.record_failure("ollama", "refused")
    assert a.cache.admit("ollama") is False
    assert a.cache.board_status() == {"backend": "flaky", "up": False}
    assert a.cache.board_up is False


def test_trip_made_without_the_board_is_published_when_it_returns(board, pair, clock):
    a, b = pair
    board.backend.broken = True
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    board.backend.broken = False
    clock.advance(shared.RETRY_FIRST)
    assert a.cache.sync() is True
    assert a.cache.admit("ollama") is False  # the board did not wipe the local trip
    b.cache.sync()
    assert b.cache.admit("ollama") is False
    assert b.cache.retry_after("ollama") == pytest.approx(BACKOFF - shared.RETRY_FIRST)


def test_trial_elected_without_the_board_is_this_workers_own(board, pair, clock):
    a, b = pair
    for _ in range(THRESHOLD):
        a.cache.record_failure("ollama", "refused")
    b.cache.sync()
    board.backend.broken = True
    clock.advance(BACKOFF)
    assert [a.cache.admit("ollama"), a.cache.admit("ollama")] == [True, False]
    assert b.cache.admit("ollama") is True


# --- choosing a backend ----------------------------------------------------------------------

@pytest.mark.parametrize("url", ["", "memory", "sqlite:///tmp/x/board.sqlite3",
                                 "redis://127.0.0.1:6379/0", "redis://localhost",
                                 "rediss://:secret@redis.internal:6380/2"])
def test_shared_state_url_accepts(url):
    assert build_config({"SHARED_STATE_URL": url})["SHARED_STATE_URL"] == url


@pytest.mark.parametrize("url", ["postgres://db/x", "redis://", "redis://h:port/0",
                                 "redis://h:6379/99", "sqlite://relative", "sqlite:///",
                                 "memcached"])
def test_shared_state_url_rejects_naming_the_variable(url):
    with pytest.raises(ConfigError, match="SHARED_STATE_URL"):
        build_config({"SHARED_STATE_URL": url})


@pytest.mark.parametrize("prefix", ["", "has space", "x" * 101])
def test_shared_state_prefix_rejects(prefix):
    with pytest.raises(ConfigError, match="SHARED_STATE_PREFIX"):
        build_config({"SHARED_STATE_PREFIX": prefix})


def test_shared_state_defaults():
    config = build_config({})
    assert (config["SHARED_STATE_URL"], config["SHARED_STATE_PREFIX"]) == ("", "mana-llm:")


def test_redis_password_is_a_secret_to_redact():
    config = build_config({"SHARED_STATE_URL": "redis://:hunter2-board@127.0.0.1:6379/0"})
    assert "hunter2-board" in secrets(config)


@pytest.mark.parametrize("url, environ, expected", [
    ("memory", {"MANA_LLM_RUNTIME_DIR": "/tmp"}, None),
    ("", {}, None),
    ("", {"MANA_LLM_RUNTIME_DIR": "/run/x"}, ("sqlite", "/run/x/board.sqlite3")),
    ("sqlite:///var/lib/mana/board.db", {}, ("sqlite", "/var/lib/mana/board.db")),
    ("redis://127.0.0.1:1/0", {}, ("redis", None)),
])
def test_open_board_picks_the_backend(url, environ, expected):
    board = shared.open_board({"SHARED_STATE_URL": url, "SHARED_STATE_PREFIX": "p:"}, environ)
    if expected is None:
        assert board is None
        return
    assert board.name == expected[0]
    if expected[1]:
        assert board.backend.path == expected[1]
    board.close()
