"""Capacity caps (SPEC §13): slots as leases on every board backend, the per-worker share
without a board, and what the chain walk does at the cap."""

import gc
import socket
import threading
import time

import pytest

from app import errors
from app.config import ConfigError, build_config, provider_caps
from app.routing.aliases import Entry, Route
from app.routing.board import BoardUnavailable, GuardedBoard, MemoryBoard
from app.routing.board_sqlite import SqliteBoard
from app.routing.breaker import HealthCache
from app.routing.capacity import LEASE_TTL, Capacity
from app.routing.fallback import ChainWalker
from app.streaming import prime
from tests import redis_server
from tests.conftest import FakeClock
from tests.test_fallback import FakeProvider, RecordingRecorder, StubInFlight

WALL0 = 1_700_000_000.0


@pytest.fixture
def wall():
    return FakeClock(WALL0)


# --- the backends: one contract ------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_backend(request, tmp_path):
    """Return a function that opens another client of one board (another worker's)."""
    opened, server = [], None
    if request.param == "redis":
        redis_server.require()
        server = redis_server.RedisServer().start()

    def open_one():
        if request.param == "memory":
            board = opened[0] if opened else MemoryBoard()
        elif request.param == "sqlite":
            board = SqliteBoard(str(tmp_path / "board.sqlite3"))
        else:
            from app.routing.board_redis import RedisBoard

            board = RedisBoard(server.url, "test:")
        opened.append(board)
        return board

    yield open_one
    for board in opened:
        board.close()
    if server is not None:
        server.stop()


def worker(open_backend, wall, caps=None, **kw):
    """Return a Capacity standing for one worker on the shared board."""
    return Capacity(caps or {"ollama": 2}, board=GuardedBoard(open_backend()), wall=wall, **kw)


def test_cap_bounds_the_slots_of_every_worker_on_the_board(open_backend, wall):
    one, two = worker(open_backend, wall), worker(open_backend, wall)
    held = [one.claim("ollama"), two.claim("ollama")]
    assert all(held)
    assert one.claim("ollama") is None and two.claim("ollama") is None
    one.release(held[1])  # any worker's release frees a slot for all
    assert two.claim("ollama") is not None


def test_status_counts_the_whole_board(open_backend, wall):
    one, two = worker(open_backend, wall), worker(open_backend, wall)
    one.claim("ollama")
    two.claim("ollama")
    assert one.status() == {"ollama": {"inflight": 2, "cap": 2, "scope": "board"}}


def test_a_dead_workers_slots_come_back_when_their_leases_expire(open_backend, wall):
    dead, alive = worker(open_backend, wall), worker(open_backend, wall)
    dead.claim("ollama")
    dead.claim("ollama")   # then killed with -9: never released, never renewed
    assert alive.claim("ollama") is None
    wall.advance(LEASE_TTL - 1)
    assert alive.claim("ollama") is None
    wall.advance(2)
    assert alive.claim("ollama") is not None
    assert alive.status()["ollama"]["inflight"] == 1


def test_renewed_leases_outlive_their_first_expiry(open_backend, wall):
    holder, other = worker(open_backend, wall), worker(open_backend, wall)
    holder.claim("ollama")
    holder.claim("ollama")
    for _ in range(4):
        wall.advance(LEASE_TTL * 0.6)
        holder.renew()
    assert other.claim("ollama") is None
    assert other.status()["ollama"]["inflight"] == 2


def test_a_released_slot_is_not_renewed(open_backend, wall):
    holder, other = worker(open_backend, wall, {"ollama": 1}), \
        worker(open_backend, wall, {"ollama": 1})
    holder.release(holder.claim("ollama"))
    holder.renew()
    assert other.claim("ollama") is not None


def test_a_second_release_is_ignored(open_backend, wall):
    one = worker(open_backend, wall)
    slot = one.claim("ollama")
    one.claim("ollama")
    one.release(slot)
    one.release(slot)
    assert one.status()["ollama"]["inflight"] == 1


def test_redis_slot_keys_are_under_the_prefix_and_expire(wall):
    redis_server.require()
    import redis

    from app.routing.board_redis import RedisBoard

    server = redis_server.RedisServer().start()
    try:
        board = RedisBoard(server.url, "test:")
        Capacity({"ollama": 2}, board=GuardedBoard(board), wall=wall).claim("ollama")
        client = redis.Redis.from_url(server.url, decode_responses=True)
        keys = client.keys("*")
        assert keys == ["test:slots:ollama"]
        assert 0 < client.pttl(keys[0]) <= LEASE_TTL * 2000
        client.close()
        board.close()
    finally:
        server.stop()


# --- no board, or a board that fails ---------------------------------------------------------

class SpyBoard(MemoryBoard):
    """A memory board that counts its calls and can be told to fail like a dead Redis."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.broken = False

    def _maybe_fail(self):
        self.calls += 1
        if self.broken:
            raise BoardUnavailable("connection refused")

    def acquire_slot(self, *args, **kw):
        self._maybe_fail()
        return super().acquire_slot(*args, **kw)

    def release_slot(self, *args):
        self._maybe_fail()
        return super().release_slot(*args)

    def refresh_slots(self, *args, **kw):
        self._maybe_fail()
        return super().refresh_slots(*args, **kw)

    def count_slots(self, *args, **kw):
        self._maybe_fail()
        return super().count_slots(*args, **kw)

    def check(self):
        self._maybe_fail()


def test_an_uncapped_provider_never_touches_the_board(wall):
    spy = SpyBoard()
    capacity = Capacity({"ollama": 2}, board=GuardedBoard(spy), wall=wall)
    for _ in range(3):
        capacity.release(capacity.claim("groq"))
    assert spy.calls == 0


def test_without_a_board_each_worker_has_an_equal_share():
    capacity = Capacity({"ollama": 5, "groq": 1}, workers=2)
    assert [capacity.claim("ollama") is not None for _ in range(3)] == [True, True, False]
    assert capacity.claim("groq") is not None   # at least one slot per worker
    assert capacity.status()["ollama"] == {"inflight": 2, "cap": 2, "scope": "worker"}


def test_a_failed_board_falls_back_to_the_share_and_back(wall, clock):
    spy = SpyBoard()
    guard = GuardedBoard(spy, clock=clock)
    capacity = Capacity({"ollama": 4}, board=guard, workers=2, wall=wall)
    on_board = capacity.claim("ollama")
    spy.broken = True
    local = [capacity.claim("ollama"), capacity.claim("ollama"), capacity.claim("ollama")]
    assert [slot is not None for slot in local] == [True, True, False]
    assert capacity.status()["ollama"]["scope"] == "worker"
    spy.broken = False
    clock.advance(10)
    assert guard.reconnect()
    # Back on the board: the slot taken there is still counted, the local ones are not.
    assert capacity.status()["ollama"] == {"inflight": 1, "cap": 4, "scope": "board"}
    for slot in local[:2]:
        capacity.release(slot)   # given back locally: nothing reaches the board
    assert capacity.status()["ollama"]["inflight"] == 1
    capacity.release(on_board)
    assert capacity.status()["ollama"]["inflight"] == 0


class LateBoard(MemoryBoard):
    """A board that takes a slot but whose answer never arrives (Redis stopped, then resumed)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.late = False

    def acquire_slot(self, provider, cap, token, owner, *, now, ttl):
        taken = super().acquire_slot(provider, cap, token, owner, now=now, ttl=ttl)
        if self.late:
            raise BoardUnavailable("Timeout reading from socket")
        return taken


def test_a_lease_left_by_an_unanswered_acquire_is_given_back_when_the_board_returns(
        wall, clock):
    late = LateBoard(wall=wall)
    guard = GuardedBoard(late, clock=clock)
    capacity = Capacity({"ollama": 2}, board=guard, workers=2, wall=wall)
    late.late = True
    local = capacity.claim("ollama")   # the board ran it, but we only saw the timeout
    assert local is not None and local.where == "local"
    capacity.release(local)
    late.late = False
    clock.advance(10)
    assert guard.reconnect()
    wall.advance(LEASE_TTL / 5)        # the next renewal, well before the lease would expire
    capacity.renew()
    assert capacity.status()["ollama"]["inflight"] == 0
    assert [capacity.claim("ollama") is not None for _ in range(3)] == [True, True, False]


def test_listeners_see_every_call_in_and_out():
    capacity = Capacity({"ollama": 1})
    seen = []
    capacity.subscribe(lambda provider, delta: seen.append((provider, delta)))
    slot, other = capacity.claim("ollama"), capacity.claim("groq")
    assert capacity.claim("ollama") is None   # turned away: not in flight
    capacity.release(slot)
    capacity.release(other)
    assert seen == [("ollama", 1), ("groq", 1), ("ollama", -1), ("groq", -1)]


# --- waiting for a slot ------------------------------------------------------------------------

def release_later(capacity, slot, delay=0.1):
    timer = threading.Timer(delay, capacity.release, args=(slot,))
    timer.start()
    return timer


@pytest.mark.parametrize("on_board", [False, True], ids=["local", "board"])
def test_a_waiter_gets_the_slot_another_call_frees(on_board):
    board = GuardedBoard(MemoryBoard()) if on_board else None
    capacity = Capacity({"ollama": 1}, board=board)
    timer = release_later(capacity, capacity.claim("ollama"))
    assert capacity.claim("ollama", wait=10) is not None
    timer.join()


def test_a_waiter_whose_caller_left_gives_up_even_when_a_slot_frees():
    capacity = Capacity({"ollama": 1})
    timer = release_later(capacity, capacity.claim("ollama"))
    asked = []
    assert capacity.claim("ollama", wait=10, gone=lambda: asked.append(1) or True) is None
    timer.join()
    assert asked and capacity.status()["ollama"]["inflight"] == 0


def test_a_waiter_gives_up_after_its_wait():
    capacity = Capacity({"ollama": 1})
    capacity.claim("ollama")
    started = time.monotonic()
    assert capacity.claim("ollama", wait=0.2) is None
    assert time.monotonic() - started >= 0.2


# --- configuration -----------------------------------------------------------------------------

def test_caps_are_unset_by_default():
    config = build_config({})
    assert provider_caps(config) == {} and config["QUEUE_TIMEOUT"] == 30


def test_caps_are_read_per_provider():
    config = build_config({"OLLAMA_MAX_CONCURRENCY": "4", "GROQ_MAX_CONCURRENCY": " 20 ",
                           "OPENAI_MAX_CONCURRENCY": ""})
    assert provider_caps(config) == {"ollama": 4, "groq": 20}


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "4 calls"])
def test_a_bad_cap_stops_startup_naming_the_variable(value):
    with pytest.raises(ConfigError, match="OLLAMA_MAX_CONCURRENCY"):
        build_config({"OLLAMA_MAX_CONCURRENCY": value})


def test_a_bad_queue_timeout_names_the_variable():
    with pytest.raises(ConfigError, match="QUEUE_TIMEOUT"):
        build_config({"QUEUE_TIMEOUT": "soon"})


# --- in the chain walk ---------------------------------------------------------------------------

PROVIDERS = ("ollama", "groq", "openrouter")


class Walk:
    """A walker with one capped provider (ollama, cap 1) and a script of answers."""

    def __init__(self, clock, queue_timeout=0.2, unconfigured=()):
        self.health = HealthCache(PROVIDERS, threshold=2, backoff=60, clock=clock)
        self.capacity = Capacity({"ollama": 1}, queue_timeout=queue_timeout)
        self.recorder = RecordingRecorder()
        self.called = []
        providers = {name: FakeProvider(name, name not in unconfigured) for name in PROVIDERS}
        self.walker = ChainWalker(providers, self.health, StubInFlight(), self.recorder,
                                  self.capacity)

    def ask(self, provider, entry, call):
        self.called.append(entry.provider)
        return {"answer": entry.provider}

    def walk(self, *providers, alias="mana/test", **kw):
        route = Route(alias or f"{providers[0]}/m", alias,
                      tuple(Entry(name, "m") for name in providers))
        return self.walker.walk(route, kw.pop("ask", self.ask), **kw)

    def attempts(self):
        return [(a.model, a.reason) for a in self.recorder.chains[-1][0]]

    def inflight(self):
        return self.capacity.status()["ollama"]["inflight"]


@pytest.fixture
def capped(clock):
    return Walk(clock)


def test_at_the_cap_an_alias_skips_the_entry_as_saturated(capped):
    capped.capacity.claim("ollama")
    outcome = capped.walk("ollama", "groq")
    assert outcome.entry.provider == "groq" and capped.called == ["groq"]
    assert capped.attempts() == [("ollama/m", "saturated")]


def test_below_the_cap_the_slot_is_held_for_the_call_and_given_back(capped):
    seen = []
    capped.walk("ollama", "groq", ask=lambda p, e, c: seen.append(capped.inflight()))
    assert seen == [1] and capped.inflight() == 0


def test_a_failed_call_gives_its_slot_back(capped):
    def fail(provider, entry, call):
        if entry.provider == "ollama":
            raise errors.UpstreamError("boom")
        return {}

    capped.walk("ollama", "groq", ask=fail)
    assert capped.inflight() == 0


@pytest.mark.parametrize("why", ["unconfigured", "tripped", "cannot-serve", "none-after"])
def test_the_last_eligible_entry_waits_then_answers_503_saturated(clock, why):
    walk = Walk(clock, unconfigured=("groq",) if why == "unconfigured" else ())
    if why == "tripped":
        walk.health.record_failure("groq", "down")
        walk.health.record_failure("groq", "down")
    can_serve = (lambda provider, model: provider.name != "groq") if why == "cannot-serve" \
        else None
    chain = ("groq", "ollama") if why == "none-after" else ("ollama", "groq")
    walk.capacity.claim("ollama")
    started = time.monotonic()
    with pytest.raises(errors.ChainExhausted) as caught:
        walk.walk(*chain, can_serve=can_serve,
                  ask=lambda p, e, c: (_ for _ in ()).throw(errors.UpstreamError("x"))
                  if e.provider == "groq" else {})
    assert time.monotonic() - started >= 0.2   # it waited its QUEUE_TIMEOUT
    error = caught.value
    assert error.status == 503 and error.kind == "no_healthy_provider"
    assert {"model": "ollama/m", "reason": "saturated"} in error.attempts
    assert error.headers()["Retry-After"] == "1"


def test_the_last_eligible_entry_is_served_when_a_slot_frees(clock):
    walk = Walk(clock, queue_timeout=10, unconfigured=("groq",))
    timer = release_later(walk.capacity, walk.capacity.claim("ollama"))
    assert walk.walk("ollama", "groq").entry.provider == "ollama"
    timer.join()
    assert walk.inflight() == 0


def test_an_entry_with_an_eligible_one_after_it_does_not_wait(clock):
    walk = Walk(clock, queue_timeout=10)
    walk.capacity.claim("ollama")
    started = time.monotonic()
    assert walk.walk("ollama", "groq").entry.provider == "groq"
    assert time.monotonic() - started < 5


def test_a_directly_named_model_waits_for_a_slot(clock):
    walk = Walk(clock, queue_timeout=10)
    timer = release_later(walk.capacity, walk.capacity.claim("ollama"))
    assert walk.walk("ollama", alias=None).entry.provider == "ollama"
    timer.join()


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "stream"])
def test_a_caller_who_left_while_queued_gets_no_upstream_call(clock, streaming):
    walk = Walk(clock, queue_timeout=10)
    timer = release_later(walk.capacity, walk.capacity.claim("ollama"))
    ours, theirs = socket.socketpair()
    theirs.close()   # the caller hung up while its request waited for the slot
    try:
        with pytest.raises(errors.ChainExhausted) as caught:
            walk.walk("ollama", alias=None, client=ours, streaming=streaming)
    finally:
        ours.close()
        timer.join()
    assert caught.value.attempts == [{"model": "ollama/m", "reason": "saturated"}]
    assert walk.called == [] and walk.inflight() == 0


def test_a_directly_named_model_answers_503_saturated_after_its_wait(capped):
    capped.capacity.claim("ollama")
    with pytest.raises(errors.ChainExhausted) as caught:
        capped.walk("ollama", alias=None)
    assert caught.value.attempts == [{"model": "ollama/m", "reason": "saturated"}]
    assert capped.called == []


def test_a_saturated_skip_leaves_no_half_open_trial_out(clock):
    walk = Walk(clock)
    walk.health.record_failure("ollama", "down")
    walk.health.record_failure("ollama", "down")
    clock.advance(61)   # half-open: the next admitted call is the trial
    walk.capacity.claim("ollama")
    walk.walk("ollama", "groq")
    assert walk.health.admit("ollama")   # the trial was given back, not wedged


def test_a_stream_holds_its_slot_until_it_ends(capped):
    def chunks():
        yield {"choices": [{"delta": {"content": "hi"}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    stream = capped.walk("ollama", ask=lambda p, e, c: prime(chunks()), streaming=True).result
    assert capped.inflight() == 1
    list(stream)
    assert capped.inflight() == 0
    stream.close()
    assert capped.inflight() == 0


def test_a_stream_closed_early_gives_its_slot_back(capped):
    def chunks():
        while True:
            yield {"choices": [{"delta": {"content": "hi"}}]}

    stream = capped.walk("ollama", ask=lambda p, e, c: prime(chunks()), streaming=True).result
    next(iter(stream))
    stream.close()
    assert capped.inflight() == 0


def test_a_stream_dropped_unread_gives_its_slot_back(capped):
    def chunks():
        while True:
            yield {"choices": [{"delta": {"content": "hi"}}]}

    outcome = capped.walk("ollama", ask=lambda p, e, c: prime(chunks()), streaming=True)
    assert capped.inflight() == 1
    del outcome   # e.g. an after-request hook failed: the response is never iterated
    gc.collect()
    assert capped.inflight() == 0
