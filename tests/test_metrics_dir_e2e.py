"""Recycled workers keep the metrics directory bounded and the counters exact."""

import glob
import os
import shutil
import subprocess
import threading
import time

import pytest
import requests

from serving.metrics_archive import WORKER_FILES
from tests.conftest import REPO, provider_env

pytestmark = pytest.mark.e2e

MAX_REQUESTS = 5
ROUNDS = 140  # each a /health and a 404: 280 requests, ~56 recycles of 5 requests


def sample(text, name, **labels):
    """Return the value of one sample of a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


class ScrapeWatch:
    """Scrape /metrics in a thread while workers recycle; note any counter that went back."""

    def __init__(self, url):
        self.url = url
        self.scrapes = 0
        self.went_back = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        last = 0.0
        while not self.done.wait(0.05):
            try:
                response = requests.get(self.url + "/metrics", timeout=30)
            except requests.RequestException:
                continue
            text = response.text
            if response.status_code != 200 or "mana_llm_requests_total{" not in text:
                self.went_back.append((response.status_code, text[:2000]))
                continue
            now = sample(text, "mana_llm_requests_total", method="GET", endpoint="/health",
                         status="200")
            if now < last:
                self.went_back.append((last, now))
            last = now
            self.scrapes += 1

    def stop(self):
        self.done.set()
        self.thread.join(timeout=30)


class PidWatch:
    """Collect every worker pid the master has, polled in a thread."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.seen = set(gateway.worker_pids())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.02):
            self.seen.update(self.gateway.worker_pids())

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)
        return self.seen


def test_recycled_workers_fold_into_the_archive(gateway_factory, fake_factory, tmp_path):
    directory = tmp_path / "metrics"
    fake = fake_factory("ollama")
    env = dict(provider_env({"ollama": fake}), ALIASES_PATH=os.path.join(REPO, "aliases.yaml"),
               MAX_REQUESTS=str(MAX_REQUESTS), MAX_REQUESTS_JITTER="0",
               PROMETHEUS_MULTIPROC_DIR=str(directory))
    gateway = gateway_factory(env)
    # The readiness checks of the fixture were counted too: start from here.
    before = requests.get(gateway.url + "/metrics", timeout=30).text
    watch = PidWatch(gateway)
    scrapes = ScrapeWatch(gateway.url)
    counts = {"200": 0, "404": 0}
    try:
        for _ in range(ROUNDS):
            # A new connection each time (no session), so recycled workers are not waited on.
            for path, status in (("/health", "200"), ("/no-such-path", "404")):
                response = requests.get(gateway.url + path, timeout=30)
                assert response.status_code == int(status)
                counts[status] += 1
    finally:
        workers = watch.stop()
        scrapes.stop()
    started = time.monotonic()
    scrape = requests.get(gateway.url + "/metrics", timeout=30)
    scrape_seconds = time.monotonic() - started
    files = sorted(os.path.basename(p) for p in glob.glob(str(directory / "*.db")))
    recycles = len(workers) - 2
    print(f"{recycles} recycles, {len(files)} files ({files}), "
          f"scrape {scrape_seconds * 1000:.1f} ms, {scrapes.scrapes} scrapes during recycles")
    assert recycles >= 50
    assert scrapes.scrapes > 0 and not scrapes.went_back, \
        f"a counter went backwards between scrapes during recycles: {scrapes.went_back}"
    # Each live worker's own files, plus one archive per folded kind.
    assert len(files) <= len(WORKER_FILES) * 2 + 2, \
        "dead workers' files were not folded into the archive"
    assert "counter_archive.db" in files and "histogram_archive.db" in files

    def grew(name, **labels):
        return sample(scrape.text, name, **labels) - sample(before, name, **labels)

    assert grew("mana_llm_requests_total", method="GET", endpoint="/health",
                status="200") == counts["200"]
    assert grew("mana_llm_requests_total", method="GET", endpoint="unmatched",
                status="404") == counts["404"]
    assert grew("mana_llm_request_latency_seconds_count", method="GET",
                endpoint="/health") == counts["200"]
    assert grew("mana_llm_request_latency_seconds_bucket", method="GET",
                endpoint="/health", le="+Inf") == counts["200"]
    promtool = shutil.which("promtool")
    if promtool:
        result = subprocess.run([promtool, "check", "metrics"], input=scrape.content,
                                capture_output=True, timeout=30)
        # promtool's lint warnings (naming) are not failures; a parse error is.
        assert b"error" not in result.stderr.lower() + result.stdout.lower(), result
