"""Background probes: find dead providers before callers have to.

One thread per worker (started after fork) wakes every ``TICK`` seconds
and starts a probe, each in its own short thread so one hanging probe
never delays another or a request, for every provider that is due:

- at boot, then every ``PROBE_INTERVAL``;
- ``RETRY_SOON`` seconds after a failed probe while the provider is not
  yet tripped, so two failures (the default threshold) come within
  seconds rather than a whole interval apart;
- every ``TRIPPED_EVERY`` seconds while the provider is tripped, so a
  recovered provider is noticed within seconds: a probe that answers
  during the backoff makes the next call the single half-open trial
  (the health cache decides; a failed trial re-arms the whole backoff);
- when a call to the provider has been waiting longer than
  ``STUCK_AFTER`` (at most once per ``SUSPECT_GAP``, since long
  generations are normal); and if that probe itself has not answered
  within ``SECOND_OPINION_AFTER``, a second one alongside it. A box that
  accepts connections and never answers thus collects its two failures
  about 1 + 1 + PROBE_TIMEOUT seconds after calls start hanging, while
  the first caller is still waiting, and the callers after it skip it.
  A healthy provider answers a probe (one cheap GET) at once, so one
  that is merely slow to generate gets one extra GET per SUSPECT_GAP.

The prober is also the one place that aborts the calls still waiting on
a provider once it is skipped: when the health cache trips it (whoever
recorded the failure), and when a probe fails while it is already tripped
(a half-open trial that hangs, say).
"""

import logging
import threading
import time

from app.errors import GatewayError

log = logging.getLogger(__name__)

TICK = 0.25
RETRY_SOON = 0.5
STUCK_AFTER = 1.0
SUSPECT_GAP = 5.0
SECOND_OPINION_AFTER = 1.0
TRIPPED_EVERY = 3.0


class Prober:
    """Probe every configured provider in the background and feed the health cache."""

    def __init__(self, providers, health, *, interval, timeout, inflight,
                 clock=time.monotonic, spawn=None):
        self._providers = providers
        # How a probe is started: its own short thread (tests run it inline).
        self._spawn = spawn or _in_thread
        self._health = health
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._due = {name: 0.0 for name in providers}
        self._probing = {name: 0 for name in providers}
        self._last_started = {name: float("-inf") for name in providers}
        self._inflight = inflight
        self._stop = threading.Event()
        self._thread = None
        health.subscribe(self._health_changed)

    def start(self):
        """Start the probe loop (call after fork: threads do not survive it)."""
        if self._thread is None and self._providers:
            self._thread = threading.Thread(target=self._loop, name="mana-llm-prober",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _loop(self):
        while True:
            self._inflight.enforce_deadlines()
            self._inflight.abort_orphans()
            self.probe_due()
            if self._stop.wait(TICK):
                return

    def probe_due(self):
        """Start a probe for every provider that is due now."""
        now = self._clock()
        for name in self._providers:
            if self._is_due(name, now):
                self._spawn(self.probe_one, name)

    def _is_due(self, name, now):
        with self._lock:
            probing, since = self._probing[name], now - self._last_started[name]
            if probing == 0 and now >= self._due[name]:
                due = True
            elif probing == 0 and since > TRIPPED_EVERY and self._health.is_tripped(name):
                due = True
            elif self._health.in_backoff(name):
                due = False  # already skipped: the scheduled probes are enough
            elif probing == 0:
                due = since > SUSPECT_GAP and self._stuck(name, now)
            else:
                due = probing == 1 and since > SECOND_OPINION_AFTER and self._stuck(name, now)
            if due:
                self._probing[name] += 1
                self._last_started[name] = now
            return due

    def _stuck(self, name, now):
        """Tell whether a call to ``name`` has been waiting longer than STUCK_AFTER."""
        return any(now - started > STUCK_AFTER
                   for started in self._inflight.started_times(name))

    def probe_one(self, name):
        """Probe one provider and record what it says."""
        try:
            self._providers[name].probe(self._timeout)
        except GatewayError as exc:
            self._record_failure(name, exc)
        except Exception:
            # A bug of ours must neither kill the prober nor count against the provider.
            log.exception("probe of %s crashed", name)
            self._schedule(name, self._interval)
        else:
            self._health.record_probe_ok(name)
            self._schedule(name, self._interval)
        finally:
            with self._lock:
                self._probing[name] -= 1

    def _record_failure(self, name, exc):
        message = exc.message  # redacted at the provider's edge
        log.info("probe of %s failed: %s", name, message)
        self._health.record_failure(name, f"probe: {message}", probe=True)
        tripped = self._health.in_backoff(name)
        if tripped:
            self._abandon_calls(name)
        self._schedule(name, self._interval if tripped else RETRY_SOON)

    def _health_changed(self, name, healthy):
        if not healthy:
            self._abandon_calls(name)

    def _abandon_calls(self, name):
        # Callers still waiting on a skipped provider move on to their next
        # entry now instead of each waiting out its read timeout.
        self._inflight.abort_provider(name, "provider-tripped")

    def _schedule(self, name, delay):
        with self._lock:
            self._due[name] = self._clock() + delay


def _in_thread(probe, name):
    threading.Thread(target=probe, args=(name,), daemon=True,
                     name=f"mana-llm-probe-{name}").start()
