"""Background probes: find dead providers before callers have to.

One thread per worker (started after fork) wakes every ``TICK`` seconds
and starts a probe, each in its own short thread so one hanging probe
never delays another or a request, for every provider that is due:

- at boot, then every ``PROBE_INTERVAL``;
- ``RETRY_SOON`` seconds after a failed probe while the provider is not
  yet tripped, so two failures (the default threshold) come within
  seconds rather than a whole interval apart;
- at once when a call to the provider has been waiting longer than
  ``STUCK_AFTER`` with no probe since it started: a box that accepts
  connections and never answers is then found by probes while the
  caller is still waiting, so the callers after it skip the provider
  (within 10 s with the defaults). A probe is one cheap GET, and
  ``STUCK_PROBE_GAP`` bounds how often a healthy provider that is merely
  slow to generate gets one.
"""

import itertools
import logging
import threading
import time

from app.errors import GatewayError

log = logging.getLogger(__name__)

TICK = 0.25
RETRY_SOON = 0.5
STUCK_AFTER = 1.0
# Long generations are normal: while calls are slow, probe at most this
# often, so a busy healthy provider sees at most one extra GET per gap.
STUCK_PROBE_GAP = 2.0


class Prober:
    """Probe every configured provider in the background and feed the health cache."""

    def __init__(self, providers, health, *, interval, timeout, clock=time.monotonic):
        self._providers = providers
        self._health = health
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._due = {name: 0.0 for name in providers}
        self._probing = set()
        self._last_started = {name: float("-inf") for name in providers}
        self._in_flight = {name: {} for name in providers}
        self._tokens = itertools.count()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Start the probe loop (call after fork: threads do not survive it)."""
        if self._thread is None and self._providers:
            self._thread = threading.Thread(target=self._loop, name="mana-llm-prober",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def call_started(self, provider):
        """Note that a call to ``provider`` is waiting; return a token for call_finished."""
        token = next(self._tokens)
        calls = self._in_flight.get(provider)
        if calls is not None:
            calls[token] = self._clock()
        return token

    def call_finished(self, provider, token):
        calls = self._in_flight.get(provider)
        if calls is not None:
            calls.pop(token, None)

    def _loop(self):
        while True:
            self.probe_due()
            if self._stop.wait(TICK):
                return

    def probe_due(self):
        """Start a probe for every provider that is due now."""
        now = self._clock()
        for name in self._providers:
            if self._is_due(name, now):
                threading.Thread(target=self.probe_one, args=(name,), daemon=True,
                                 name=f"mana-llm-probe-{name}").start()

    def _is_due(self, name, now):
        with self._lock:
            if name in self._probing:
                return False
            waiting = list(self._in_flight[name].values())
            last = self._last_started[name]
            stuck = now - last > STUCK_PROBE_GAP and any(
                now - started > STUCK_AFTER and started > last for started in waiting)
            if now < self._due[name] and not stuck:
                return False
            self._probing.add(name)
            self._last_started[name] = now
            return True

    def probe_one(self, name):
        """Probe one provider and record what it says."""
        try:
            self._providers[name].probe(self._timeout)
        except GatewayError as exc:
            self._record_failure(name, exc)
        except Exception as exc:  # a bug in a probe must not kill the prober
            log.exception("probe of %s crashed", name)
            self._record_failure(name, exc)
        else:
            # A probe ends a breaker's backoff no sooner than a request
            # would: it acts as the half-open trial once the backoff is over.
            if not self._health.in_backoff(name):
                self._health.record_success(name)
            self._schedule(name, self._interval)
        finally:
            with self._lock:
                self._probing.discard(name)

    def _record_failure(self, name, exc):
        message = getattr(exc, "message", None) or type(exc).__name__
        log.info("probe of %s failed: %s", name, message)
        self._health.record_failure(name, f"probe: {message}")
        tripped = self._health.in_backoff(name)
        self._schedule(name, self._interval if tripped else RETRY_SOON)

    def _schedule(self, name, delay):
        with self._lock:
            self._due[name] = self._clock() + delay
