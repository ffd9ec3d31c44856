"""The provider health cache (SPEC §7): threshold, backoff, half-open trial, cooldown."""

import logging
import threading
import time

import pytest

from app.routing.breaker import HealthCache

WALL0 = 1_700_000_000.0
THRESHOLD = 2
BACKOFF = 60.0


@pytest.fixture
def cache(clock):
    return make_cache(clock)


def make_cache(clock, **kw):
    kw.setdefault("threshold", THRESHOLD)
    kw.setdefault("backoff", BACKOFF)
    return HealthCache(["groq", "ollama"], clock=clock, wall=lambda: WALL0 + clock.now, **kw)


def trip(cache, provider="groq", error="connection refused"):
    for _ in range(THRESHOLD):
        cache.record_failure(provider, error)


def admits(cache, provider="groq", times=1):
    return [cache.admit(provider) for _ in range(times)]


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_failures_below_threshold_keep_provider_admitted(clock, threshold):
    cache = make_cache(clock, threshold=threshold)
    for _ in range(threshold - 1):
        cache.record_failure("groq", "boom")
    assert admits(cache, times=3) == [True, True, True]
    assert cache.snapshot()["groq"]["status"] == "healthy"


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_threshold_consecutive_failures_trip_provider(clock, threshold):
    cache = make_cache(clock, threshold=threshold)
    for _ in range(threshold):
        cache.record_failure("groq", "boom")
    assert cache.admit("groq") is False
    assert cache.snapshot()["groq"]["status"] == "unhealthy"


def test_success_between_failures_restarts_the_count(cache):
    cache.record_failure("groq", "boom")
    cache.record_success("groq")
    cache.record_failure("groq", "boom")
    assert cache.admit("groq") is True
    assert cache.snapshot()["groq"]["consecutive_failures"] == 1


def test_tripping_one_provider_leaves_others_admitted(cache):
    trip(cache, "groq")
    assert cache.admit("ollama") is True


@pytest.mark.parametrize("elapsed", [0.0, 30.0, BACKOFF - 0.001])
def test_tripped_provider_is_not_admitted_during_backoff(cache, clock, elapsed):
    trip(cache)
    clock.advance(elapsed)
    assert admits(cache, times=3) == [False, False, False]


def test_after_backoff_exactly_one_admit_is_the_trial(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    assert admits(cache, times=4) == [True, False, False, False]


def test_trial_success_resets_provider(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    assert cache.admit("groq") is True
    cache.record_success("groq")
    state = cache.snapshot()["groq"]
    assert (state["status"], state["consecutive_failures"]) == ("healthy", 0)
    assert state["unhealthy_until_unix"] is None
    assert admits(cache, times=3) == [True, True, True]


def test_trial_failure_rearms_backoff(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    assert cache.admit("groq") is True
    cache.record_failure("groq", "still down")
    clock.advance(BACKOFF - 0.001)
    assert cache.admit("groq") is False
    clock.advance(0.001)
    assert cache.admit("groq") is True


def test_failure_while_tripped_extends_backoff(cache, clock):
    trip(cache)                                   # backoff until 60
    clock.advance(30)
    cache.record_failure("groq", "late failure")  # refreshed: until 90
    clock.advance(BACKOFF - 0.001)
    assert cache.admit("groq") is False
    clock.advance(0.001)
    assert cache.admit("groq") is True


def test_failure_while_tripped_never_moves_deadline_earlier(cache, clock):
    trip(cache)
    first = cache.snapshot()["groq"]["unhealthy_until_unix"]
    clock.advance(10)
    cache.record_failure("groq", "again")
    assert cache.snapshot()["groq"]["unhealthy_until_unix"] >= first


def test_rate_limit_skips_provider_for_retry_after(cache, clock):
    cache.record_rate_limit("groq", 7)
    assert cache.admit("groq") is False
    clock.advance(6.999)
    assert cache.admit("groq") is False
    clock.advance(0.001)
    assert admits(cache, times=3) == [True, True, True]


def test_rate_limit_is_not_a_failure(cache, clock):
    events = []
    cache.subscribe(lambda provider, healthy: events.append((provider, healthy)))
    for _ in range(THRESHOLD + 1):
        cache.record_rate_limit("groq", 5)
    assert cache.snapshot()["groq"]["consecutive_failures"] == 0
    clock.advance(5)
    # Healthy again, not half-open: every caller is admitted, not just one trial.
    assert admits(cache, times=3) == [True, True, True]
    assert events == []


def test_shorter_rate_limit_does_not_shorten_cooldown(cache, clock):
    cache.record_rate_limit("groq", 30)
    cache.record_rate_limit("groq", 5)
    clock.advance(10)
    assert cache.admit("groq") is False
    assert cache.retry_after("groq") == pytest.approx(20)


def test_unreported_trial_is_released_after_trial_timeout(clock):
    cache = make_cache(clock, trial_timeout=5)
    trip(cache)
    clock.advance(BACKOFF)
    assert cache.admit("groq") is True
    clock.advance(4.999)
    assert cache.admit("groq") is False
    clock.advance(0.001)
    assert cache.admit("groq") is True


def test_release_ends_trial_without_changing_state(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    assert cache.admit("groq") is True
    before = cache.snapshot()["groq"]
    cache.release("groq")
    assert cache.snapshot()["groq"] == before
    assert admits(cache, times=2) == [True, False]  # a new trial may go out


def test_release_of_unknown_provider_is_harmless(cache):
    cache.release("nobody")
    assert "nobody" not in cache.snapshot()


def test_unknown_provider_is_admitted(cache):
    assert admits(cache, "together", times=2) == [True, True]


def test_listener_is_told_once_on_trip(cache):
    events = []
    cache.subscribe(lambda provider, healthy: events.append((provider, healthy)))
    trip(cache)
    cache.record_failure("groq", "more")
    cache.record_failure("groq", "and more")
    assert events == [("groq", False)]


def test_listener_is_told_once_on_recovery(cache, clock):
    events = []
    cache.subscribe(lambda provider, healthy: events.append((provider, healthy)))
    trip(cache)
    clock.advance(BACKOFF)
    cache.admit("groq")
    cache.record_success("groq")
    cache.record_success("groq")
    assert events == [("groq", False), ("groq", True)]


def test_listener_is_not_told_without_a_transition(cache):
    events = []
    cache.subscribe(lambda provider, healthy: events.append((provider, healthy)))
    cache.record_success("groq")
    cache.record_failure("groq", "one failure is below the threshold")
    cache.record_success("groq")
    assert events == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_raising_listener_is_logged_and_others_still_told(cache, clock):
    def broken(provider, healthy):
        raise RuntimeError("listener bug")

    events = []
    cache.subscribe(broken)
    cache.subscribe(lambda provider, healthy: events.append((provider, healthy)))
    handler = _Records()
    logger = logging.getLogger("app.routing.breaker")
    logger.addHandler(handler)
    try:
        trip(cache)
        clock.advance(BACKOFF)
        assert cache.admit("groq") is True
        cache.record_success("groq")
    finally:
        logger.removeHandler(handler)
    assert events == [("groq", False), ("groq", True)]
    assert cache.snapshot()["groq"]["status"] == "healthy"
    logged = [r.exc_info[0] for r in handler.records if r.exc_info]
    assert logged == [RuntimeError, RuntimeError]


def test_snapshot_lists_every_provider_from_the_start(cache):
    healthy = {"status": "healthy", "consecutive_failures": 0, "last_error": None,
               "last_check_unix": None, "unhealthy_until_unix": None}
    assert cache.snapshot() == {"groq": healthy, "ollama": healthy}


def test_snapshot_describes_tripped_provider(cache, clock):
    clock.advance(10)
    trip(cache, error="ConnectTimeout")
    assert cache.snapshot()["groq"] == {
        "status": "unhealthy", "consecutive_failures": THRESHOLD,
        "last_error": "ConnectTimeout", "last_check_unix": WALL0 + 10,
        "unhealthy_until_unix": WALL0 + 10 + BACKOFF}


def test_snapshot_describes_failure_below_threshold(cache, clock):
    clock.advance(3)
    cache.record_failure("groq", "HTTP 500")
    assert cache.snapshot()["groq"] == {
        "status": "healthy", "consecutive_failures": 1, "last_error": "HTTP 500",
        "last_check_unix": WALL0 + 3, "unhealthy_until_unix": None}


def test_snapshot_shows_rate_limited_provider_skipped_until_cooldown_ends(cache, clock):
    cache.record_rate_limit("groq", 7)
    state = cache.snapshot()["groq"]
    assert state["status"] == "unhealthy"
    assert state["consecutive_failures"] == 0
    assert state["unhealthy_until_unix"] == pytest.approx(WALL0 + 7)


def test_snapshot_after_recovery_is_healthy(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    cache.admit("groq")
    clock.advance(1)
    cache.record_success("groq")
    state = cache.snapshot()["groq"]
    assert (state["status"], state["consecutive_failures"]) == ("healthy", 0)
    assert state["unhealthy_until_unix"] is None
    assert state["last_check_unix"] == WALL0 + BACKOFF + 1


def test_concurrent_admits_after_backoff_let_exactly_one_trial_through(cache, clock):
    """A smoke test: the race window is tiny, so this rarely catches a missing lock."""
    trip(cache)
    clock.advance(BACKOFF)
    barrier = threading.Barrier(20)
    results = []
    lock = threading.Lock()

    def caller():
        barrier.wait()
        admitted = cache.admit("groq")
        with lock:
            results.append(admitted)

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert len(results) == 20
    assert results.count(True) == 1


def test_probe_success_does_not_clear_failures_of_real_calls(cache):
    cache.record_failure("groq", "read timeout on /chat/completions")
    cache.record_probe_ok("groq")  # GET /models still answers
    cache.record_failure("groq", "read timeout on /chat/completions")
    assert cache.snapshot()["groq"]["status"] == "unhealthy"


def test_probe_success_makes_the_next_call_the_single_trial_at_once(cache, clock):
    trip(cache)
    clock.advance(BACKOFF / 2)
    cache.record_probe_ok("groq")
    assert admits(cache, times=3) == [True, False, False]


def test_second_probe_after_a_cut_short_backoff_leaves_the_trial_to_a_call(cache, clock):
    trip(cache)
    clock.advance(3)
    cache.record_probe_ok("groq")
    clock.advance(3)
    cache.record_probe_ok("groq")
    assert cache.snapshot()["groq"]["status"] == "unhealthy"
    assert admits(cache, times=2) == [True, False]


def test_idle_provider_whose_probes_answer_recovers_after_a_whole_backoff(cache, clock):
    trip(cache)
    clock.advance(3)
    cache.record_probe_ok("groq")   # cut short, but no call comes to be the trial
    clock.advance(BACKOFF)
    cache.record_probe_ok("groq")
    assert cache.snapshot()["groq"]["status"] == "healthy"


def test_probe_success_during_the_backoff_does_not_close_the_breaker(cache, clock):
    seen = []
    cache.subscribe(lambda provider, healthy: seen.append((provider, healthy)))
    trip(cache)
    clock.advance(1)
    cache.record_probe_ok("groq")
    assert cache.snapshot()["groq"]["status"] == "unhealthy"
    assert seen == [("groq", False)]


def test_trial_after_a_probe_that_fails_rearms_the_whole_backoff(cache, clock):
    trip(cache)
    clock.advance(1)
    cache.record_probe_ok("groq")          # GET /models answers...
    assert cache.admit("groq") is True
    cache.record_failure("groq", "500")    # ...but the real call still fails
    clock.advance(BACKOFF - 0.001)
    assert cache.admit("groq") is False
    clock.advance(0.001)
    assert cache.admit("groq") is True


def test_a_call_admitted_before_the_trip_cannot_close_the_breaker(cache):
    assert cache.admit("groq")      # a long call starts while groq is healthy
    trip(cache)                     # others fail meanwhile; groq trips
    cache.record_success("groq")    # the long call answers after the trip
    assert cache.snapshot()["groq"]["status"] == "unhealthy"
    assert not cache.admit("groq")


def test_provider_that_answers_probes_but_fails_calls_stays_out(cache, clock):
    trip(cache)
    clock.advance(1)
    cache.record_probe_ok("groq")
    assert cache.admit("groq") is True
    cache.record_failure("groq", "500 on the trial")
    for _ in range(5):                      # probes keep answering, every 3 s
        clock.advance(3)
        cache.record_probe_ok("groq")
        assert cache.admit("groq") is False
    clock.advance(BACKOFF - 15)
    assert cache.admit("groq") is True      # the ordinary trial after the whole backoff


def test_failed_probe_lets_the_next_answering_probe_cut_the_backoff_again(cache, clock):
    trip(cache)
    cache.record_probe_ok("groq")
    assert cache.admit("groq") is True
    cache.record_failure("groq", "trial failed")
    clock.advance(3)
    cache.record_failure("groq", "probe: ConnectTimeout", probe=True)  # it went dark
    clock.advance(3)
    cache.record_probe_ok("groq")            # and came back
    assert admits(cache, times=2) == [True, False]


def test_is_tripped_covers_backoff_and_half_open(cache, clock):
    assert cache.is_tripped("groq") is False
    trip(cache)
    assert cache.is_tripped("groq") is True
    clock.advance(BACKOFF)
    assert cache.is_tripped("groq") is True
    cache.admit("groq")
    cache.record_success("groq")
    assert cache.is_tripped("groq") is False


def test_probe_success_then_trial_success_closes_the_breaker(cache, clock):
    seen = []
    cache.subscribe(lambda provider, healthy: seen.append((provider, healthy)))
    trip(cache)
    clock.advance(2)
    cache.record_probe_ok("groq")
    assert cache.admit("groq") is True
    cache.record_success("groq")
    assert admits(cache, times=3) == [True, True, True]
    assert seen == [("groq", False), ("groq", True)]


def test_probe_success_after_backoff_closes_the_breaker(cache, clock):
    seen = []
    cache.subscribe(lambda provider, healthy: seen.append((provider, healthy)))
    trip(cache)
    clock.advance(BACKOFF + 1)
    cache.record_probe_ok("groq")
    assert admits(cache, times=3) == [True, True, True]
    assert seen == [("groq", False), ("groq", True)]


def test_probe_success_leaves_a_running_trial_to_decide(cache, clock):
    trip(cache)
    clock.advance(BACKOFF)
    assert cache.admit("groq") is True
    cache.record_probe_ok("groq")
    assert cache.snapshot()["groq"]["status"] == "unhealthy"
    cache.record_failure("groq", "the trial failed")
    assert cache.admit("groq") is False


def test_probe_success_on_a_healthy_provider_changes_nothing(cache):
    cache.record_failure("groq", "one")
    cache.record_probe_ok("groq")
    assert cache.snapshot()["groq"]["consecutive_failures"] == 1
    assert admits(cache, times=2) == [True, True]


def test_listeners_end_on_the_current_state_when_transitions_race(cache, clock):
    seen = []
    racing = threading.Event()

    def trial_succeeds():
        clock.advance(BACKOFF)
        assert cache.admit("groq")
        cache.record_success("groq")

    def slow_listener(provider, healthy):
        # While the trip is being told, a trial's success lands: the last
        # word told must match the cache's state.
        if not healthy and not racing.is_set():
            racing.set()
            threading.Thread(target=trial_succeeds).start()
        seen.append(healthy)

    cache.subscribe(slow_listener)
    trip(cache)
    assert wait_for(lambda: len(seen) == 2)
    assert seen == [False, True]
    assert cache.snapshot()["groq"]["status"] == "healthy"


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()
