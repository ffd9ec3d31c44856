"""Metrics aggregated across gunicorn workers, bounded labels, promtool, request ids."""

import concurrent.futures
import os
import re
import shutil
import signal
import socket
import subprocess
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import provider_env, wait_until, write_aliases
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]
CHAINS = {"mana/long-form": ["ollama/gemma3:12b", "groq/llama-3.3-70b-versatile"],
          "mana/fast-text": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"]}


def scrape(server):
    """Return {(sample name, frozenset(labels)): value} from one /metrics scrape."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples, name, **labels):
    """Sum a sample over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == name and wanted <= l)


def series(samples, name):
    return [labels for (n, labels) in samples if n == name]


@pytest.fixture
def metered(gateway_factory, upstreams, tmp_path):
    env = provider_env(upstreams)
    env["ALIASES_PATH"] = write_aliases(tmp_path / "aliases.yaml", CHAINS, "mana/fast-text")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    env["PROBE_INTERVAL"] = "3600"
    server = gateway_factory(env)
    server.metrics_dir = tmp_path / "metrics"
    return server


def workers_of(server, request_ids):
    pattern = re.compile(r"\[(\d+)\] \[([\w.:-]+)\] app\.access")
    return {m.group(2): int(m.group(1)) for m in pattern.finditer(server.log())
            if m.group(2) in request_ids}


def test_fifty_requests_over_both_workers_sum_to_fifty(metered):
    ids = [f"fifty-{i}-{uuid.uuid4().hex[:6]}" for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda rid: requests.post(
            metered.url + CHAT, json={"model": "qwen2.5:7b", "messages": USER},
            headers={"X-Request-ID": rid}, timeout=30), ids))
    assert all(a.status_code == 200 for a in answers)
    assert [a.headers["X-Request-ID"] for a in answers] == ids
    assert len(set(workers_of(metered, set(ids)).values())) == 2, "one worker served all"
    samples = scrape(metered)
    assert total(samples, "mana_llm_requests_total", endpoint=CHAT) == 50
    assert total(samples, "mana_llm_requests_total", endpoint=CHAT, status="200") == 50
    assert total(samples, "mana_llm_llm_requests_total") == 50
    assert total(samples, "mana_llm_llm_requests_total", provider="ollama",
                 model="qwen2.5:7b", streaming="false") == 50
    assert total(samples, "mana_llm_request_latency_seconds_count", endpoint=CHAT) == 50
    assert total(samples, "mana_llm_tokens_total", type="completion") > 0


def test_forced_fallback_moves_fallback_and_alias_counters_by_one(metered, upstreams):
    before = scrape(metered)
    upstreams["ollama"].behave("status", status=500, path="/api/chat", times=1)
    response = requests.post(metered.url + CHAT, json={"model": "mana/long-form",
                                                       "messages": USER})
    assert response.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.3-70b-versatile"
    after = scrape(metered)
    labels = {"from_model": "ollama/gemma3:12b", "to_model": "groq/llama-3.3-70b-versatile",
              "reason": "HTTP 500"}
    assert total(after, "mana_llm_fallback_total", **labels) - \
        total(before, "mana_llm_fallback_total", **labels) == 1
    resolved = {"alias": "mana/long-form", "target": "groq/llama-3.3-70b-versatile"}
    assert total(after, "mana_llm_alias_resolved_total", **resolved) - \
        total(before, "mana_llm_alias_resolved_total", **resolved) == 1
    assert total(after, "mana_llm_llm_errors_total", provider="ollama",
                 model="mana/long-form", error_type="HTTP 500") == 1


def test_exhausted_chain_counts_fallback_with_empty_to_model(metered, upstreams):
    upstreams["ollama"].behave("status", status=500, path="/api/chat")
    upstreams["groq"].behave("status", status=500, path="chat")
    response = requests.post(metered.url + CHAT, json={"model": "mana/fast-text",
                                                       "messages": USER})
    assert response.status_code == 503
    assert total(scrape(metered), "mana_llm_fallback_total",
                 from_model="groq/llama-3.1-8b-instant", to_model="") == 1


def test_provider_gauge_reads_0_when_tripped_and_1_after_recovery(gateway_factory, tmp_path):
    ollama = FakeUpstream(name="ollama").start()
    port = ollama.port
    try:
        server = gateway_factory({"OLLAMA_URL": ollama.url, "PROBE_INTERVAL": "1",
                                  "UNHEALTHY_BACKOFF": "2"})
        gauge = {"provider": "ollama"}
        assert wait_until(lambda: total(scrape(server), "mana_llm_provider_healthy",
                                        **gauge) == 1, timeout=10)
        ollama.stop()
        assert wait_until(lambda: total(scrape(server), "mana_llm_provider_healthy",
                                        **gauge) == 0, timeout=15)
        ollama = FakeUpstream(name="ollama", port=port).start()
        assert wait_until(lambda: total(scrape(server), "mana_llm_provider_healthy",
                                        **gauge) == 1, timeout=20)
    finally:
        ollama.stop()


def test_killed_worker_keeps_counters_and_drops_its_gauges(metered):
    for _ in range(20):
        requests.post(metered.url + CHAT, json={"model": "qwen2.5:7b", "messages": USER})
    before = total(scrape(metered), "mana_llm_llm_requests_total")
    assert before == 20
    victim = metered.worker_pids()[0]
    assert (metered.metrics_dir / f"gauge_livemin_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in metered.worker_pids()
                      and len(metered.worker_pids()) == 2, timeout=15)
    assert wait_until(lambda: not (metered.metrics_dir / f"gauge_livemin_{victim}.db")
                      .exists(), timeout=5)
    samples = scrape(metered)
    assert total(samples, "mana_llm_llm_requests_total") == before
    assert total(samples, "mana_llm_provider_healthy", provider="ollama") == 1


def test_made_up_model_names_are_capped(gateway_factory, upstreams, tmp_path):
    env = provider_env(upstreams)
    env["METRICS_LABEL_CAP"] = "10"
    server = gateway_factory(env)
    names = [f"made-up-{uuid.uuid4().hex[:10]}" for _ in range(5000)]

    def ask(index):
        model = names[index] if index % 2 else f"groq/{names[index]}"
        return requests.post(server.url + CHAT, json={"model": model, "messages": USER},
                             timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(ask, range(len(names))))
    assert statuses.count(200) == len(names)
    samples = scrape(server)
    workers = 2
    for name in ("mana_llm_llm_requests_total", "mana_llm_llm_latency_seconds_count",
                 "mana_llm_tokens_total"):
        models = {dict(labels)["model"] for labels in series(samples, name)}
        made_up = {m for m in models if m.startswith("made-up-")}
        assert len(made_up) <= 10 * workers, name
        assert "other" in models


def test_promtool_accepts_a_real_scrape(metered, upstreams):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    upstreams["ollama"].behave("status", status=500, path="/api/chat", times=1)
    for model in ("mana/long-form", "qwen2.5:7b", "mana/nope"):
        requests.post(metered.url + CHAT, json={"model": model, "messages": USER})
    requests.post(metered.url + CHAT, json={"model": "qwen2.5:7b", "messages": USER,
                                            "stream": True})
    text = requests.get(metered.url + "/metrics").text
    result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("mana_llm_requests_total", "mana_llm_request_latency_seconds",
                 "mana_llm_llm_requests_total", "mana_llm_tokens_total",
                 "mana_llm_llm_latency_seconds", "mana_llm_llm_errors_total",
                 "mana_llm_alias_resolved_total", "mana_llm_fallback_total",
                 "mana_llm_provider_healthy"):
        assert re.search(rf"^# TYPE {name}(_total)? ", text, re.M) or \
            re.search(rf"^# TYPE {name.removesuffix('_total')} ", text, re.M), name


def test_request_id_is_echoed_and_logged(metered):
    response = requests.post(metered.url + CHAT, json={"model": "qwen2.5:7b",
                                                       "messages": USER},
                             headers={"X-Request-ID": "req-abc.123"})
    assert response.headers["X-Request-ID"] == "req-abc.123"
    assert wait_until(lambda: "[req-abc.123] app.access: POST /v1/chat/completions 200"
                      in metered.log(), timeout=5)
    assert "model=ollama/qwen2.5:7b" in metered.log()
    generated = requests.get(metered.url + "/v1/aliases").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


@pytest.mark.parametrize("value", ["abc%0d%0aSet-Cookie: x=1", "abc\tdef", "x" * 500,
                                   "evil\u2028line"])
def test_request_id_is_sanitised_and_bounded(metered, value):
    response = requests.get(metered.url + "/v1/aliases",
                            headers={"X-Request-ID": value.encode("utf-8")})
    echoed = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", echoed)
    assert "Set-Cookie" not in response.headers


def test_raw_cr_in_request_id_cannot_inject_a_log_line(metered):
    with socket.create_connection(("127.0.0.1", metered.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/aliases HTTP/1.1\r\nHost: x\r\n"
                     b"X-Request-ID: abc\rINJECTED-LINE\r\nConnection: close\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 ")
    assert not reply.startswith(b"HTTP/1.1 5")
    assert not any(line.startswith("INJECTED") for line in metered.log().splitlines())
