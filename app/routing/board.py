"""The shared board: what every worker on it knows about each provider.

Each worker's ``HealthCache`` stays the hot path; the board behind it is
told only of transitions (a failure, a trip, a 429 cooldown, a success
that ends them, the half-open trial election) and is read by a
background sync. Per provider it holds one ``Slate``; the transitions
are pure functions of a slate, so every backend applies exactly the same
rules inside its own atomic read-modify-write:

- ``MemoryBoard``: one process (tests use it to stand for several workers);
- ``SqliteBoard`` (``board_sqlite``): the workers of one instance, one file;
- ``RedisBoard`` (``board_redis``): every instance pointed at one Redis.

Times on the board are wall-clock seconds: monotonic clocks differ
between processes and hosts. ``GuardedBoard`` puts a breaker in front of
a backend, so a board that fails or hangs is skipped, never waited on.
"""

import dataclasses
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# A slate is kept this long after its last deadline passed (Redis TTLs).
KEEP = 3600.0
# How often the background sync of a worker that lost its board tries again.
RETRY_FIRST, RETRY_MAX = 0.25, 2.0
# Set by gunicorn's master: this instance's own runtime directory.
RUNTIME_DIR_VARIABLE = "MANA_LLM_RUNTIME_DIR"
SQLITE_FILE = "board.sqlite3"


class BoardUnavailable(Exception):
    """The board did not answer (down, unreachable, unwritable, too slow); retry later."""


class BoardBusy(BoardUnavailable):
    """Too many writers raced for one slate: this call goes without, the board is fine."""


@dataclass(frozen=True)
class Slate:
    """What the board knows about one provider."""

    failures: int = 0
    failures_until: float = 0.0   # the failure count is forgotten after this
    tripped: bool = False
    tripped_until: float = 0.0    # backoff end; past it the breaker is half-open
    cooldown_until: float = 0.0   # 429 cooldown end
    trial_until: float = 0.0      # the half-open trial's lease
    trial_owner: str = ""
    last_error: str = ""
    probe_spent: bool = False     # a probe already cut this trip's backoff short

    def keep_until(self):
        """Return when nothing on this slate matters any more."""
        return max(self.failures_until, self.tripped_until, self.cooldown_until,
                   self.trial_until) + KEEP

    def failure_count(self, now):
        return self.failures if now < self.failures_until else 0


# --- transitions: pure functions of a slate ------------------------------------------------

def failed(slate, *, now, error, threshold, backoff, window, probe=False):
    """Count a failure; trip at the threshold; re-arm the backoff if tripped.

    A failed probe shows the provider was down since, so the next probe
    that answers may cut the backoff short again.
    """
    failures = slate.failure_count(now) + 1
    tripped = slate.tripped or failures >= threshold
    until = max(slate.tripped_until, now + backoff) if tripped else 0.0
    return dataclasses.replace(slate, failures=failures, failures_until=now + window,
                               tripped=tripped, tripped_until=until, trial_until=0.0,
                               trial_owner="", last_error=error,
                               probe_spent=slate.probe_spent and not probe)


def cooled(slate, *, until, error):
    """Skip the provider until ``until`` (a 429); the later cooldown wins."""
    return dataclasses.replace(slate, cooldown_until=max(slate.cooldown_until, until),
                               trial_until=0.0, trial_owner="", last_error=error)


def cleared(slate):
    """Reset the provider: it answered. A running cooldown stays."""
    return Slate(cooldown_until=slate.cooldown_until)


def claimed(slate, *, now, lease, owner):
    """Make ``owner`` the half-open trial if the backoff is over and no trial is out."""
    if not slate.tripped or now < slate.tripped_until or now < slate.trial_until:
        return slate
    return dataclasses.replace(slate, trial_until=now + lease, trial_owner=owner)


def released(slate, *, owner):
    """End ``owner``'s trial without a verdict (the answer said nothing about health)."""
    if slate.trial_owner != owner:
        return slate
    return dataclasses.replace(slate, trial_until=0.0, trial_owner="")


def probed_ok(slate, *, now, backoff):
    """A probe answered: end the backoff now, so the next call is the trial.

    Once per trip (until a probe fails): a provider that answers probes
    but fails its trial then waits out the whole backoff, so it stays out.
    Past the backoff with no trial out, the probe itself is the trial (an
    idle provider recovers too), but after a cut-short backoff only once a
    whole backoff went by without a call: that trial belongs to a real call.
    """
    if not slate.tripped:
        return slate
    if slate.tripped_until <= now:
        idle = not slate.probe_spent or now >= slate.tripped_until + backoff
        return cleared(slate) if idle and slate.trial_until <= now else slate
    if slate.probe_spent:
        return slate
    return dataclasses.replace(slate, tripped_until=now, probe_spent=True)


def republished(slate, *, until, error):
    """Record a trip a worker made while the board was away."""
    return dataclasses.replace(slate, tripped=True,
                               tripped_until=max(slate.tripped_until, until),
                               last_error=slate.last_error or error)


# --- the per-process backend -----------------------------------------------------------------

class MemoryBoard:
    """A board in one process's memory: the reference for the others, and for tests."""

    name = "memory"

    def __init__(self, *, wall=time.time):
        self._lock = threading.Lock()
        self._slates = {}
        self._counters = {}
        self._wall = wall
        self._leases = {}   # provider -> {token: (owner, expires)}

    def read(self, providers):
        with self._lock:
            return {name: self._slates[name] for name in providers if name in self._slates}

    def update(self, provider, change):
        with self._lock:
            slate = change(self._slates.get(provider, Slate()))
            if slate == Slate():
                self._slates.pop(provider, None)
            else:
                self._slates[provider] = slate
            return slate

    def check(self):
        """Raise BoardUnavailable if the board cannot be written now."""

    def close(self):
        pass

    # Counters (callers' quotas) are apart from the slates: ``counts`` is
    # ``{key: (amount, expires_at wall seconds)}``; amount 0 reads.
    def add(self, counts):
        """Add to each counter atomically; return ``{key: new value}``."""
        now = self._wall()
        with self._lock:
            counters = self._counters
            for key in [k for k, (_, until) in counters.items() if until <= now]:
                del counters[key]
            out = {}
            for key, (amount, until) in counts.items():
                value = counters.get(key, (0, until))[0] + amount
                counters[key] = (value, until)
                out[key] = value
            return out

    # --- capacity slots: leases with an owner and an expiry (app.routing.capacity) ---

    def acquire_slot(self, provider, cap, token, owner, *, now, ttl):
        """Take a slot of ``provider`` if fewer than ``cap`` live leases are out; tell if taken."""
        with self._lock:
            leases = self._leases.setdefault(provider, {})
            for old in [t for t, (_, expires) in leases.items() if expires <= now]:
                del leases[old]
            if len(leases) >= cap:
                return False
            leases[token] = (owner, now + ttl)
            return True

    def release_slot(self, provider, token):
        with self._lock:
            self._leases.get(provider, {}).pop(token, None)

    def refresh_slots(self, tokens, *, now, ttl):
        """Extend the leases ``{provider: [token]}`` still held (an expired one stays gone)."""
        with self._lock:
            for provider, held in tokens.items():
                leases = self._leases.get(provider, {})
                for token in held:
                    if token in leases and leases[token][1] > now:
                        leases[token] = (leases[token][0], now + ttl)

    def count_slots(self, providers, *, now):
        """Return ``{provider: live leases}``."""
        with self._lock:
            return {name: sum(1 for _, expires in self._leases.get(name, {}).values()
                              if expires > now) for name in providers}


# --- the breaker in front of a backend -------------------------------------------------------

class GuardedBoard:
    """A backend behind a breaker of its own: after a failure it is skipped, not waited on.

    Calls on a request's path go to the backend only while it is up; after
    a failure they return None at once (the caller falls back to its own
    cache) until the background sync has seen ``check`` pass again, which
    it retries with a backoff from RETRY_FIRST to RETRY_MAX seconds.
    """

    def __init__(self, backend, *, clock=time.monotonic):
        self.backend = backend
        self._clock = clock
        self._lock = threading.Lock()
        self._up = True
        self._retry_at = 0.0
        self._retry_gap = RETRY_FIRST
        self._listeners = []

    @property
    def name(self):
        return self.backend.name

    @property
    def up(self):
        return self._up

    def subscribe(self, listener):
        """Call ``listener(up)`` when the board goes down or comes back."""
        self._listeners.append(listener)

    def announce(self):
        """Tell every listener the current state (a new worker sets its gauge)."""
        for listener in list(self._listeners):
            self._tell(listener, self._up)

    def read(self, providers):
        """Return ``{provider: Slate}``, or None while the board is unavailable."""
        return self._attempt(self.backend.read, providers)

    def update(self, provider, change):
        """Apply ``change`` atomically; return the new Slate, or None if unavailable."""
        return self._attempt(self.backend.update, provider, change)

    def add(self, counts):
        """Add to counters atomically; return ``{key: value}``, or None if unavailable."""
        return self._attempt(self.backend.add, counts)

    def cache_get(self, key):
        """Return a response cache entry (bytes), or None if absent or unavailable."""
        return self._attempt(self.backend.get, key)

    def cache_put(self, key, raw, expires, max_bytes):
        """Keep a response cache entry; return the store's bytes, or None if unavailable."""
        return self._attempt(self.backend.put, key, raw, expires, max_bytes)

    def acquire_slot(self, provider, cap, token, owner, *, now, ttl):
        """Tell whether the slot was taken; None while the board is unavailable."""
        return self._attempt(functools.partial(self.backend.acquire_slot, now=now, ttl=ttl),
                             provider, cap, token, owner)

    def release_slot(self, provider, token):
        return self._attempt(self.backend.release_slot, provider, token)

    def refresh_slots(self, tokens, *, now, ttl):
        return self._attempt(functools.partial(self.backend.refresh_slots, now=now, ttl=ttl),
                             tokens)

    def count_slots(self, providers, *, now):
        """Return ``{provider: live leases}``, or None while the board is unavailable."""
        return self._attempt(functools.partial(self.backend.count_slots, now=now), providers)

    def reconnect(self):
        """Try a down board again if its retry is due; return whether it is up."""
        with self._lock:
            if self._up:
                return True
            if self._clock() < self._retry_at:
                return False
        try:
            self.backend.check()
        except BoardUnavailable as exc:
            self._went_down(exc)
            return False
        self._came_back()
        return True

    def close(self):
        try:
            self.backend.close()
        except BoardUnavailable:
            pass

    def _attempt(self, method, *args):
        if not self._up:
            return None
        try:
            return method(*args)
        except BoardBusy as exc:
            log.info("shared state board busy, this call goes without it: %s", exc)
            return None
        except BoardUnavailable as exc:
            self._went_down(exc)
            return None

    def _went_down(self, exc):
        with self._lock:
            was_up, self._up = self._up, False
            if was_up:
                self._retry_gap = RETRY_FIRST
            else:
                self._retry_gap = min(self._retry_gap * 2, RETRY_MAX)
            self._retry_at = self._clock() + self._retry_gap
        if was_up:
            log.warning("shared state board (%s) unavailable, each worker uses its own "
                        "health cache until it is back: %s", self.name, exc)
            self._tell_all(False)

    def _came_back(self):
        with self._lock:
            was_up, self._up = self._up, True
        if not was_up:
            log.warning("shared state board (%s) is back", self.name)
            self._tell_all(True)

    def _tell_all(self, up):
        for listener in list(self._listeners):
            self._tell(listener, up)

    @staticmethod
    def _tell(listener, up):
        try:
            listener(up)
        except Exception:
            log.exception("shared state listener failed")


# --- choosing a backend ----------------------------------------------------------------------

def describe(url):
    """Return the backend a SHARED_STATE_URL names, without secrets, for logs and health."""
    if not url:
        return "sqlite (this instance's runtime directory)"
    if url == "memory":
        return "memory"
    if url.startswith("sqlite:"):
        return "sqlite"
    return "redis"


def open_board(config, environ=None):
    """Return the GuardedBoard that SHARED_STATE_URL names, or None for per-worker state."""
    environ = os.environ if environ is None else environ
    url = config.get("SHARED_STATE_URL", "")
    if url == "memory":
        return None
    if url.startswith(("redis://", "rediss://")):
        from app.routing.board_redis import RedisBoard

        return GuardedBoard(RedisBoard(url, config.get("SHARED_STATE_PREFIX", "mana-llm:")))
    from app.routing.board_sqlite import SqliteBoard

    if url.startswith("sqlite:"):
        return GuardedBoard(SqliteBoard(sqlite_path(url)))
    directory = environ.get(RUNTIME_DIR_VARIABLE)
    if not directory:
        # Not under our gunicorn master (a test app, flask run): one process
        # has no one to share with.
        log.info("no runtime directory from a gunicorn master: health state is per worker")
        return None
    return GuardedBoard(SqliteBoard(os.path.join(directory, SQLITE_FILE)))


def sqlite_path(url):
    """Return the absolute file a ``sqlite:///path/to/file`` URL names ("" if it names none)."""
    path = urlsplit(url).path
    return "/" + path.lstrip("/") if path.strip("/") else ""
