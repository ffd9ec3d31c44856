"""Prober scheduling, stepped with a fake clock; probes run inline instead of in threads."""

import pytest

from app import errors
from app.providers.inflight import InFlight
from app.routing import probes
from app.routing.breaker import HealthCache
from app.routing.probes import Prober

INTERVAL = 30.0


class FakeProvider:
    def __init__(self):
        self.failing = None
        self.probes = 0

    def probe(self, timeout):
        self.probes += 1
        if self.failing is not None:
            raise self.failing


@pytest.fixture
def setup(clock):
    provider = FakeProvider()
    health = HealthCache(["ollama"], threshold=2, backoff=60, clock=clock)
    inflight = InFlight(clock=clock)
    prober = Prober({"ollama": provider}, health, interval=INTERVAL, timeout=3,
                    inflight=inflight, clock=clock, spawn=lambda probe, name: probe(name))
    return prober, provider, health, inflight


def test_probes_at_boot_then_every_interval(setup, clock):
    prober, provider, _, _ = setup
    prober.probe_due()
    assert provider.probes == 1
    clock.advance(INTERVAL - 1)
    prober.probe_due()
    assert provider.probes == 1
    clock.advance(1)
    prober.probe_due()
    assert provider.probes == 2


def test_a_failed_probe_is_retried_soon_until_the_provider_trips(setup, clock):
    prober, provider, health, _ = setup
    provider.failing = errors.UpstreamUnavailable("refused", reason="ConnectionError")
    prober.probe_due()
    clock.advance(probes.RETRY_SOON)
    prober.probe_due()
    assert provider.probes == 2
    assert health.snapshot()["ollama"]["status"] == "unhealthy"
    clock.advance(probes.RETRY_SOON)
    prober.probe_due()
    assert provider.probes == 2  # tripped: back to the interval


def test_a_call_stuck_longer_than_a_second_brings_a_probe_forward(setup, clock):
    prober, provider, _, inflight = setup
    prober.probe_due()
    clock.advance(probes.SUSPECT_GAP + 0.1)
    inflight.begin("ollama")
    prober.probe_due()
    assert provider.probes == 1  # the call is young
    clock.advance(probes.STUCK_AFTER + 0.1)
    prober.probe_due()
    assert provider.probes == 2


def test_stuck_calls_bring_at_most_one_probe_per_suspect_gap(setup, clock):
    prober, provider, _, inflight = setup
    prober.probe_due()
    inflight.begin("ollama")
    clock.advance(probes.SUSPECT_GAP + 0.1)
    prober.probe_due()
    clock.advance(1)
    prober.probe_due()
    assert provider.probes == 2


def test_calls_waiting_on_a_provider_that_trips_are_aborted(setup, clock):
    prober, provider, health, inflight = setup
    waiting = inflight.begin("ollama")
    health.record_failure("ollama", "x")
    assert waiting.aborted is None
    health.record_failure("ollama", "x")  # trips, whoever recorded it
    assert waiting.aborted == "provider-tripped"


def test_a_failed_probe_of_a_tripped_provider_aborts_its_trial(setup, clock):
    prober, provider, health, inflight = setup
    health.record_failure("ollama", "x")
    health.record_failure("ollama", "x")
    clock.advance(60)
    assert health.admit("ollama")  # the half-open trial goes out and hangs
    trial = inflight.begin("ollama")
    provider.failing = errors.UpstreamUnavailable("no answer", reason="ReadTimeout")
    prober.probe_one("ollama")
    assert trial.aborted == "provider-tripped"


def test_a_bug_in_a_probe_is_not_a_provider_failure(setup, clock):
    prober, provider, health, _ = setup
    provider.failing = KeyError("x")
    prober.probe_due()
    assert health.snapshot()["ollama"]["consecutive_failures"] == 0
    clock.advance(probes.RETRY_SOON)
    prober.probe_due()
    assert provider.probes == 1  # rescheduled at the interval, not retried soon


def test_a_tripped_provider_is_probed_every_few_seconds_and_recovers_by_one_trial(setup, clock):
    prober, provider, health, _ = setup
    provider.failing = errors.UpstreamUnavailable("refused", reason="ConnectionError")
    prober.probe_due()
    clock.advance(probes.RETRY_SOON)
    prober.probe_due()
    assert health.is_tripped("ollama")
    clock.advance(probes.TRIPPED_EVERY + 0.1)
    prober.probe_due()
    assert provider.probes == 3  # well inside the 60 s backoff
    assert not health.admit("ollama")
    provider.failing = None
    clock.advance(probes.TRIPPED_EVERY + 0.1)
    prober.probe_due()
    assert provider.probes == 4
    assert health.admit("ollama")       # the one trial, long before the backoff ends
    assert not health.admit("ollama")   # and only one
