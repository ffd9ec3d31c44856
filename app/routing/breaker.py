"""The provider health cache: a circuit breaker per provider.

``FAILURE_THRESHOLD`` consecutive failures trip a provider for
``UNHEALTHY_BACKOFF`` seconds; while tripped it is skipped. When the
backoff runs out the breaker is half-open: ``admit`` lets exactly one
caller through as the trial, and everyone else keeps skipping until the
trial reports. A 429 cools a provider down for its ``Retry-After``,
separately from the failure count. Time is injected, so tests step a
fake clock instead of sleeping.

With a shared board (``app.routing.board``) the cache stays the hot path:
a call to a healthy provider never touches the board. Failures, trips,
cooldowns, the success that ends them and the half-open trial election
go through the board, and a background sync pulls what other workers
recorded into this cache every ``SYNC_INTERVAL`` seconds. When the board
is unavailable the cache works alone, exactly as with no board.
"""

import functools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from app.routing import board as shared

log = logging.getLogger(__name__)

# Every worker honours what another recorded within this (plus one board read).
SYNC_INTERVAL = 0.25


@dataclass
class ProviderHealth:
    healthy: bool = True
    consecutive_failures: int = 0
    last_error: str = None
    last_check: float = None          # wall clock, for humans
    unhealthy_until: float = 0.0      # monotonic: breaker backoff
    cooldown_until: float = 0.0       # monotonic: 429 cooldown
    trial_until: float = 0.0          # monotonic: a half-open trial is out until then
    trial_mine: bool = False          # this worker holds the board's trial lease
    probe_spent: bool = False         # a probe already cut this trip's backoff short
    version: int = 0                  # bumped by every change, so a sync never undoes one


class HealthCache:
    """Thread-safe health state of every provider of one worker."""

    def __init__(self, providers, *, threshold=2, backoff=60.0, trial_timeout=None,
                 clock=time.monotonic, wall=time.time, board=None, failure_window=600.0):
        self._lock = threading.Lock()
        self._state = {name: ProviderHealth() for name in providers}
        self._threshold = threshold
        self._backoff = backoff
        # A trial whose caller never reports (it crashed, or the answer said
        # nothing about health) must not wedge the breaker half-open forever.
        self._trial_timeout = trial_timeout or max(backoff, 1.0)
        self._clock = clock
        self._wall = wall
        self._listeners = []
        # Listeners run outside the state lock; this lock and the last state
        # told keep racing transitions from reaching them out of order.
        self._notify_lock = threading.Lock()
        self._told = {}
        # The shared board (a GuardedBoard) or None: this worker alone.
        self._board = board
        # A failure counts on the board until this long passes without another.
        self._failure_window = failure_window
        # Who holds a trial lease on the board: this worker, whichever thread.
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, interval=SYNC_INTERVAL):
        """Load the board's state, then keep syncing in the background (after fork)."""
        if self._board is None or self._thread is not None:
            return self
        # Before the worker serves: a new worker starts from what others learned.
        self.sync()
        self._thread = threading.Thread(target=self._sync_loop, args=(interval,),
                                        name="mana-llm-board-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._board is not None:
            self._board.close()

    @property
    def board_up(self):
        """Tell whether the shared board answers (True when there is none to lose)."""
        return self._board is None or self._board.up

    def board_status(self):
        """Return the board's backend and whether it answers, or None without a board."""
        if self._board is None:
            return None
        return {"backend": self._board.name, "up": self._board.up}

    def subscribe(self, listener):
        """Call ``listener(provider, healthy)`` on every healthy<->unhealthy transition."""
        self._listeners.append(listener)

    def _notify(self, provider):
        """Tell listeners the provider's current state, if it differs from the last told."""
        with self._notify_lock:
            with self._lock:
                state = self._state[provider]
                healthy, error = state.healthy, state.last_error
            if self._told.get(provider, True) == healthy:
                return
            self._told[provider] = healthy
            if healthy:
                log.info("provider %s is healthy again", provider)
            else:
                log.warning("provider %s marked unhealthy: %s", provider, error)
            for listener in list(self._listeners):
                try:
                    listener(provider, healthy)
                except Exception:
                    log.exception("health listener failed for %s", provider)

    def _get(self, provider):
        state = self._state.get(provider)
        if state is None:
            state = self._state[provider] = ProviderHealth()
        return state

    # --- the hot path ------------------------------------------------------------------------

    def admit(self, provider):
        """Tell whether a call to ``provider`` may go out now (maybe as the trial)."""
        now = self._clock()
        with self._lock:
            state = self._state.get(provider)
            if state is None:
                return True  # unknown providers count as healthy
            if now < state.cooldown_until:
                return False
            if state.healthy:
                return True
            if now < state.unhealthy_until or now < state.trial_until:
                return False
            state.trial_until = now + self._trial_timeout
            state.trial_mine = True
            state.version += 1
        return self._elect(provider)

    def _elect(self, provider):
        """Claim the board's one half-open trial for this worker; tell whether it won."""
        slate = self._share(provider, functools.partial(
            shared.claimed, now=self._wall(), lease=self._trial_timeout, owner=self._owner))
        if slate is None:
            return True  # no board to ask: this worker's own trial
        # Lost: another worker's trial is out (or its verdict is in already).
        return slate.trial_owner == self._owner or not slate.tripped

    def record_success(self, provider):
        """Reset the provider: a call answered."""
        with self._lock:
            state = self._get(provider)
            if not state.healthy and not state.trial_mine:
                # A call admitted before the trip, answering after it: while
                # tripped only the half-open trial's answer closes the breaker.
                return
        self._reset(provider)

    def _reset(self, provider):
        with self._lock:
            state = self._get(provider)
            was_healthy = state.healthy
            # A healthy provider with nothing counted has nothing to tell the board.
            news = not state.healthy or state.consecutive_failures > 0 or state.trial_mine
            state.healthy = True
            state.consecutive_failures = 0
            state.unhealthy_until = state.trial_until = 0.0
            state.trial_mine = state.probe_spent = False
            state.last_check = self._wall()
            if news:
                state.version += 1
        if news:
            self._share(provider, shared.cleared)
        if not was_healthy:
            self._notify(provider)

    def release(self, provider):
        """End a trial that said nothing about health (the caller's own error)."""
        with self._lock:
            state = self._state.get(provider)
            if state is None or not state.trial_until:
                return
            mine = state.trial_mine
            state.trial_until = 0.0
            state.trial_mine = False
            state.version += 1
        if mine:
            self._share(provider, functools.partial(shared.released, owner=self._owner))

    # --- transitions -------------------------------------------------------------------------

    def record_probe_ok(self, provider):
        """A probe answered: make the next call to a tripped provider the trial, now.

        It never clears failures that real calls recorded during a backoff:
        an upstream can answer ``GET /models`` and still hang or fail on
        every completion, so a real call is the trial. Once per trip, until
        a probe fails: after a failed trial the provider waits out its whole
        backoff (it stays out). Past the backoff, with no trial out, the
        probe is the trial and closes the breaker, so an idle provider
        recovers too (``board.probed_ok`` has the rule).
        """
        now = self._clock()
        with self._lock:
            state = self._get(provider)
            state.last_check = self._wall()
            if state.healthy:
                return
            if now < state.unhealthy_until:
                if state.probe_spent:
                    return
                state.unhealthy_until = now
                state.probe_spent = True
                state.version += 1
                close = False
            else:
                close = now >= state.trial_until and (
                    not state.probe_spent or now >= state.unhealthy_until + self._backoff)
        slate = self._share(provider, functools.partial(
            shared.probed_ok, now=self._wall(), backoff=self._backoff))
        if slate is None and close:
            self._reset(provider)

    def record_failure(self, provider, error, *, probe=False):
        """Count a failure; trip at the threshold; re-arm the backoff if tripped.

        ``probe``: the failure is a probe's, so the provider was down since;
        the next probe that answers may cut the backoff short again.
        """
        error = str(error)[:300]
        with self._lock:
            state = self._get(provider)
            state.last_error = error
            state.last_check = self._wall()
            state.version += 1
        slate = self._share(provider, functools.partial(
            shared.failed, now=self._wall(), error=error, threshold=self._threshold,
            backoff=self._backoff, window=self._failure_window, probe=probe))
        if slate is None:
            self._fail_alone(provider, probe)

    def _fail_alone(self, provider, probe):
        """Count a failure in this worker only (no board, or it is unavailable)."""
        now = self._clock()
        with self._lock:
            state = self._get(provider)
            was_healthy = state.healthy
            state.consecutive_failures += 1
            state.trial_until = 0.0
            state.trial_mine = False
            state.probe_spent = state.probe_spent and not probe
            if state.consecutive_failures >= self._threshold or not state.healthy:
                state.healthy = False
                # The later deadline wins: a new one never shortens the old.
                state.unhealthy_until = max(state.unhealthy_until, now + self._backoff)
            tripped = was_healthy and not state.healthy
        if tripped:
            self._notify(provider)

    def record_rate_limit(self, provider, retry_after):
        """Skip the provider until its Retry-After has passed (not a failure)."""
        now = self._clock()
        error = f"rate-limited for {retry_after:g}s"
        with self._lock:
            state = self._get(provider)
            state.cooldown_until = max(state.cooldown_until, now + retry_after)
            state.last_error = error
            state.last_check = self._wall()
            state.trial_until = 0.0
            state.trial_mine = False
            state.version += 1
        self._share(provider, functools.partial(
            shared.cooled, until=self._wall() + retry_after, error=error))

    # --- the board ---------------------------------------------------------------------------

    def _share(self, provider, change):
        """Apply ``change`` on the board and take its verdict; return the slate (None: alone)."""
        if self._board is None:
            return None
        slate = self._board.update(provider, change)
        if slate is not None:
            now, wall = self._clock(), self._wall()
            with self._lock:
                changed = self._adopt(self._get(provider), slate, now, wall)
            if changed:
                self._notify(provider)
        return slate

    def sync(self):
        """Pull what every worker recorded on the board into this cache; tell if it could."""
        board = self._board
        if board is None:
            return False
        if not board.up:
            if not board.reconnect():
                return False
            self._republish()
        with self._lock:
            versions = {name: state.version for name, state in self._state.items()}
        slates = board.read(list(versions))
        if slates is None:
            return False
        now, wall = self._clock(), self._wall()
        changed = []
        with self._lock:
            for name, version in versions.items():
                state = self._state[name]
                # A change made here while the board was read is newer than the read.
                if state.version == version and self._adopt(
                        state, slates.get(name, shared.Slate()), now, wall):
                    changed.append(name)
        for name in changed:
            self._notify(name)
        return True

    def _sync_loop(self, interval):
        while not self._stop.wait(interval):
            try:
                self.sync()
            except Exception:  # a bug here must not end the sync for good
                log.exception("shared state sync failed")

    def _republish(self):
        """Tell a board that came back about the trips this worker made without it."""
        now, wall = self._clock(), self._wall()
        with self._lock:
            tripped = {name: (wall + max(0.0, state.unhealthy_until - now), state.last_error)
                       for name, state in self._state.items() if not state.healthy}
        for name, (until, error) in tripped.items():
            self._board.update(name, functools.partial(shared.republished, until=until,
                                                       error=error or ""))

    def _adopt(self, state, slate, now, wall):
        """Make ``state`` (under the lock) match the board's slate; tell if health changed."""
        def local(deadline):
            return now + (deadline - wall)

        was_healthy = state.healthy
        state.healthy = not slate.tripped
        state.unhealthy_until = local(slate.tripped_until) if slate.tripped else 0.0
        state.consecutive_failures = slate.failure_count(wall)
        if slate.cooldown_until > wall:
            state.cooldown_until = max(state.cooldown_until, local(slate.cooldown_until))
        state.trial_mine = slate.tripped and slate.trial_owner == self._owner \
            and slate.trial_until > wall
        state.trial_until = local(slate.trial_until) if slate.trial_until > wall else 0.0
        if slate.last_error:
            state.last_error = slate.last_error
        state.probe_spent = slate.probe_spent
        state.version += 1
        return was_healthy != state.healthy

    # --- reading -----------------------------------------------------------------------------

    def is_tripped(self, provider):
        """Tell whether the provider's breaker is open or half-open (for faster probing)."""
        with self._lock:
            state = self._state.get(provider)
            return state is not None and not state.healthy

    def in_backoff(self, provider):
        """Tell whether the provider's backoff or cooldown is still running."""
        now = self._clock()
        with self._lock:
            state = self._state.get(provider)
            return state is not None and (now < state.unhealthy_until
                                          or now < state.cooldown_until)

    def retry_after(self, provider):
        """Return seconds until the provider may be tried again, 0 if it may now."""
        now = self._clock()
        with self._lock:
            state = self._state.get(provider)
            if state is None:
                return 0.0
            until = state.cooldown_until
            if not state.healthy:
                until = max(until, state.unhealthy_until)
            return max(0.0, until - now)

    def snapshot(self):
        """Return every provider's state for ``/v1/health``."""
        now, wall = self._clock(), self._wall()
        with self._lock:
            return {name: self._describe(state, now, wall)
                    for name, state in sorted(self._state.items())}

    @staticmethod
    def _describe(state, now, wall):
        until = max(state.cooldown_until, state.unhealthy_until if not state.healthy else 0)
        skipping = now < state.cooldown_until or not state.healthy
        return {
            "status": "unhealthy" if skipping else "healthy",
            "consecutive_failures": state.consecutive_failures,
            "last_error": state.last_error,
            "last_check_unix": state.last_check,
            "unhealthy_until_unix": wall + (until - now) if until > now else None,
        }
