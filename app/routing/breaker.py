"""The provider health cache: a circuit breaker per provider.

``FAILURE_THRESHOLD`` consecutive failures trip a provider for
``UNHEALTHY_BACKOFF`` seconds; while tripped it is skipped. When the
backoff runs out the breaker is half-open: ``admit`` lets exactly one
caller through as the trial, and everyone else keeps skipping until the
trial reports. A 429 cools a provider down for its ``Retry-After``,
separately from the failure count. Time is injected, so tests step a
fake clock instead of sleeping.
"""

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class ProviderHealth:
    healthy: bool = True
    consecutive_failures: int = 0
    last_error: str = None
    last_check: float = None          # wall clock, for humans
    unhealthy_until: float = 0.0      # monotonic: breaker backoff
    cooldown_until: float = 0.0       # monotonic: 429 cooldown
    trial_until: float = 0.0          # monotonic: a half-open trial is out until then


class HealthCache:
    """Thread-safe health state of every provider of one worker."""

    def __init__(self, providers, *, threshold=2, backoff=60.0, trial_timeout=None,
                 clock=time.monotonic, wall=time.time):
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

    def subscribe(self, listener):
        """Call ``listener(provider, healthy)`` on every healthy<->unhealthy transition."""
        self._listeners.append(listener)

    def _notify(self, provider):
        """Tell listeners the provider's current state, if it differs from the last told."""
        with self._notify_lock:
            with self._lock:
                healthy = self._state[provider].healthy
            if self._told.get(provider, True) == healthy:
                return
            self._told[provider] = healthy
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
            return True

    def record_success(self, provider):
        """Reset the provider: it answered."""
        with self._lock:
            state = self._get(provider)
            was_healthy = state.healthy
            state.healthy = True
            state.consecutive_failures = 0
            state.unhealthy_until = state.trial_until = 0.0
            state.last_check = self._wall()
        if not was_healthy:
            self._notify(provider)

    def record_probe_ok(self, provider):
        """A probe answered: end a tripped breaker whose backoff is over (as its trial).

        It never clears failures that real calls recorded: an upstream can
        answer ``GET /models`` and still hang or fail on every completion.
        """
        with self._lock:
            state = self._get(provider)
            state.last_check = self._wall()
            if state.healthy or self._clock() < state.unhealthy_until:
                return
        self.record_success(provider)

    def record_failure(self, provider, error):
        """Count a failure; trip at the threshold; re-arm the backoff if tripped."""
        now = self._clock()
        with self._lock:
            state = self._get(provider)
            was_healthy = state.healthy
            state.consecutive_failures += 1
            state.last_error = str(error)[:300]
            state.last_check = self._wall()
            state.trial_until = 0.0
            if state.consecutive_failures >= self._threshold or not state.healthy:
                state.healthy = False
                # The later deadline wins: a new one never shortens the old.
                state.unhealthy_until = max(state.unhealthy_until, now + self._backoff)
            tripped = was_healthy and not state.healthy
        if tripped:
            log.warning("provider %s marked unhealthy for %.0fs: %s", provider,
                        self._backoff, str(error)[:300])
            self._notify(provider)

    def record_rate_limit(self, provider, retry_after):
        """Skip the provider until its Retry-After has passed (not a failure)."""
        now = self._clock()
        with self._lock:
            state = self._get(provider)
            state.cooldown_until = max(state.cooldown_until, now + retry_after)
            state.last_error = f"rate-limited for {retry_after:g}s"
            state.last_check = self._wall()
            state.trial_until = 0.0

    def release(self, provider):
        """End a trial that said nothing about health (the caller's own error)."""
        with self._lock:
            state = self._state.get(provider)
            if state is not None:
                state.trial_until = 0.0

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
