"""The outage scenarios, end to end under gunicorn with 2 workers.

Health state is per worker (each has its own health cache), so tests that
count upstream hits tell which worker served each request from the
``X-Mana-LLM-Worker`` header (the worker's pid). Time bounds are only
ever far below what the failure they rule out would take (a read or
connect timeout set high for the test).
"""

import concurrent.futures
import json
import re
import threading
import time

import pytest
import requests

from tests.conftest import provider_env, wait_until, write_aliases

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]
CHAINS = {
    "mana/long-form": ["ollama/gemma3:12b", "groq/llama-3.3-70b-versatile",
                       "openrouter/anthropic/claude-3.5-sonnet"],
    "mana/fast-text": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"],
}


def start(gateway_factory, upstreams, tmp_path, **env):
    """Start a gateway on the test chains with extra environment settings."""
    full = provider_env(upstreams)
    full["ALIASES_PATH"] = write_aliases(tmp_path / "aliases.yaml", CHAINS, "mana/fast-text")
    full.update({k: str(v) for k, v in env.items()})
    return gateway_factory(full)


def ask(server, model="mana/long-form", request_id=None, timeout=30, **body):
    headers = {"X-Request-ID": request_id} if request_id else {}
    body = {"model": model, "messages": USER, **body}
    return requests.post(server.url + CHAT, json=body, headers=headers, timeout=timeout)


def worker(response):
    """Return the pid of the worker that served a response."""
    return int(response.headers["X-Mana-LLM-Worker"])


def chat_hits(fake):
    return fake.hits("/api/chat") + fake.hits("/chat/completions")


def test_refused_ollama_costs_no_timeout(gateway_factory, upstreams, tmp_path):
    upstreams["ollama"].stop()  # connection refused from now on
    server = start(gateway_factory, upstreams, tmp_path, CONNECT_TIMEOUT=20)
    for _ in range(6):
        started = time.monotonic()
        response = ask(server)
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.3-70b-versatile"
        assert response.json()["model"] == "groq/llama-3.3-70b-versatile"
        # A refusal is seen at once; waiting for the 20 s connect timeout is the bug.
        assert elapsed < 10, f"fallback took {elapsed:.2f}s"


def test_requests_we_cannot_translate_never_touch_ollama(gateway_factory, upstreams,
                                                         tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    bad = [{"role": "user", "content": "hi"},
           {"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}]
    for model in ["ollama/qwen2.5:7b"] * 5 + ["mana/fast-text"]:
        response = ask(server, model=model, messages=bad)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request"
        assert "messages[1].tool_calls[0]" in error["message"]  # names the field
    assert chat_hits(upstreams["ollama"]) == 0
    assert chat_hits(upstreams["groq"]) == 0
    for _ in range(6):  # both workers
        health = requests.get(server.url + "/v1/health").json()["providers"]["ollama"]
        assert (health["status"], health["consecutive_failures"]) == ("healthy", 0)
    assert ask(server, model="mana/fast-text").headers["X-Mana-LLM-Resolved"] == \
        "ollama/qwen2.5:7b"
    assert "Traceback" not in server.log()


def test_dark_ollama_is_skipped_long_before_its_read_timeout(
        gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path, GUNICORN_THREADS=64)
    assert ask(server).headers["X-Mana-LLM-Resolved"] == "ollama/gemma3:12b"
    upstreams["ollama"].behave("hang")
    dark_at = time.monotonic()
    outcomes = []  # (sent at, skipped?) for steady traffic from 4 callers
    stop = threading.Event()

    def caller():
        while not stop.is_set() and time.monotonic() - dark_at < 45:
            sent = time.monotonic()
            try:
                resolved = ask(server, timeout=1.5).headers["X-Mana-LLM-Resolved"]
            except requests.Timeout:
                resolved = ""  # stuck on the dark box while the gateway finds out
            outcomes.append((sent, resolved.startswith("groq/")))

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for thread in callers:
        thread.start()
    wait_until(lambda: sum(ok for _, ok in outcomes[-24:]) == 24, timeout=45, interval=0.2)
    stop.set()
    for thread in callers:
        thread.join(timeout=5)
    last_hang = max((sent for sent, ok in outcomes if not ok), default=dark_at)
    after = [ok for sent, ok in outcomes if sent > last_hang]
    assert len(after) >= 24 and all(after), "requests never consistently skipped it"
    figure = last_hang - dark_at
    print(f"\n[figure] dark Ollama: every request skips it {figure:.1f}s after it went dark"
          f" ({len(outcomes)} requests from 4 steady callers)")
    # Designed for ~3 s (probes); the read timeout it must not wait out is 120 s.
    assert figure <= 40.0


def test_callers_waiting_on_a_dark_provider_move_on_when_it_trips(
        gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)  # OLLAMA_TIMEOUT: 120 s
    upstreams["ollama"].behave("hang")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: ask(server, request_id=f"waiting-{i}"), range(6)))
    elapsed = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.headers["X-Mana-LLM-Resolved"] for a in answers} == \
        {"groq/llama-3.3-70b-versatile"}
    print(f"\n[figure] 6 callers stuck on a dark Ollama answered by the next entry "
          f"after {elapsed:.1f}s (read timeout 120 s)")
    assert elapsed < 60


def test_500s_trip_then_half_open_lets_one_trial_per_worker(
        gateway_factory, upstreams, tmp_path):
    ollama = upstreams["ollama"]
    server = start(gateway_factory, upstreams, tmp_path, UNHEALTHY_BACKOFF=4,
                   PROBE_INTERVAL=3600, SHARED_STATE_URL="memory")  # per-worker breakers
    ollama.behave("status", status=500, path="/api/chat")
    pids = []
    per_worker = {}
    # Keep asking until both workers have seen at least 3 requests each.
    while len(pids) < 80 and not (len(per_worker) == 2 and min(per_worker.values()) >= 3):
        response = ask(server)
        assert response.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.3-70b-versatile"
        pids.append(worker(response))
        per_worker = {pid: pids.count(pid) for pid in set(pids)}
    assert len(per_worker) == 2 and min(per_worker.values()) >= 3
    assert set(per_worker) == set(server.worker_pids())
    # Each worker's breaker trips after exactly 2 failures, then skips.
    assert chat_hits(ollama) == 2 * len(per_worker)
    for _ in range(6):
        health = requests.get(server.url + "/v1/health").json()["providers"]["ollama"]
        assert health["status"] == "unhealthy" and health["consecutive_failures"] == 2

    until = max(requests.get(server.url + "/v1/health").json()["providers"]["ollama"]
                ["unhealthy_until_unix"] or 0 for _ in range(6))
    assert wait_until(lambda: time.time() > until + 0.2, timeout=10)
    ollama.reset()
    ollama.behave("delay", seconds=0.6, path="/api/chat")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: ask(server), range(20)))
    assert all(a.status_code == 200 for a in answers)
    served_by = [a.headers["X-Mana-LLM-Resolved"] for a in answers]
    trial_workers = {worker(a) for a in answers}
    # Exactly one trial per worker that saw the burst; the rest kept skipping.
    assert chat_hits(ollama) == len(trial_workers)
    assert served_by.count("ollama/gemma3:12b") == len(trial_workers)

    ollama.reset()
    for i in range(8):
        response = ask(server, request_id=f"after-{i}")
        assert response.headers["X-Mana-LLM-Resolved"] == "ollama/gemma3:12b"


def test_429_cools_the_provider_for_retry_after(gateway_factory, upstreams, tmp_path):
    ollama = upstreams["ollama"]
    server = start(gateway_factory, upstreams, tmp_path, PROBE_INTERVAL=3600)
    # A 6 s cooldown, asked about for 3 s and again after 7 s: 3 s of slack
    # each way for a loaded box.
    ollama.behave("rate_limit", retry_after="6", path="/api/chat", times=1)
    sent_at = time.monotonic()
    first = ask(server)
    limited_at = time.monotonic()
    assert first.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.3-70b-versatile"
    pid = worker(first)
    during, after = [], []
    while time.monotonic() - limited_at < 3:
        response = ask(server)
        during.append((worker(response), response.headers["X-Mana-LLM-Resolved"]))
    assert wait_until(lambda: time.monotonic() - sent_at > 7, timeout=10)
    for _ in range(10):
        after.append(ask(server).headers["X-Mana-LLM-Resolved"])
    same_worker_during = [model for served_by, model in during if served_by == pid]
    assert same_worker_during, "no request reached the rate-limited worker in time"
    assert all(m.startswith("groq/") for m in same_worker_during)
    assert all(m == "ollama/gemma3:12b" for m in after)
    health = requests.get(server.url + "/v1/health").json()["providers"]["ollama"]
    assert health["consecutive_failures"] == 0  # a 429 is not a failure


def test_upstream_400_stops_the_walk_and_leaves_health_alone(gateway_factory, upstreams,
                                                             tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    upstreams["ollama"].behave("status", status=400, path="/api/chat",
                               body={"error": "prompt is too long"})
    for _ in range(4):
        response = ask(server)
        assert response.status_code == 400
        assert "prompt is too long" in response.json()["error"]["message"]
    assert chat_hits(upstreams["groq"]) == 0
    for _ in range(6):
        health = requests.get(server.url + "/v1/health").json()
        assert health["providers"]["ollama"]["status"] == "healthy"
        assert health["providers"]["ollama"]["consecutive_failures"] == 0


def test_every_entry_down_is_503_with_attempts(gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path, PROBE_INTERVAL=3600,
                   UPSTREAM_TIMEOUT=1.5)
    upstreams["ollama"].stop()
    upstreams["groq"].behave("status", status=502, path="chat")
    upstreams["openrouter"].behave("hang", path="chat")
    response = ask(server, timeout=60)
    body = response.json()
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false"
    assert body["detail"]["kind"] == "no_healthy_provider"
    assert [a["model"] for a in body["error"]["attempts"]] == CHAINS["mana/long-form"]
    reasons = [a["reason"] for a in body["error"]["attempts"]]
    assert reasons[0] in ("ConnectionError", "cache-unhealthy")
    assert reasons[1] == "HTTP 502"
    assert reasons[2] == "ReadTimeout"


def test_every_entry_rate_limited_is_429_with_retry_after(gateway_factory, upstreams,
                                                          tmp_path):
    server = start(gateway_factory, upstreams, tmp_path, PROBE_INTERVAL=3600)
    for name in ("ollama", "groq", "openrouter"):
        upstreams[name].behave("rate_limit", retry_after="7", path="chat")
    response = ask(server)
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert 1 <= int(response.headers["Retry-After"]) <= 7
    assert response.json()["detail"]["kind"] == "rate_limit"
    assert len(response.json()["error"]["attempts"]) == 3


def test_unknown_alias_404_and_default_alias(gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    response = ask(server, model="mana/nope")
    assert response.status_code == 404
    assert "mana/fast-text" in response.json()["error"]["message"]
    default = requests.post(server.url + CHAT, json={"messages": USER})
    assert default.headers["X-Mana-LLM-Resolved"] == "ollama/qwen2.5:7b"


def read_sse(response):
    """Return the parsed ``data:`` events of an SSE response, [DONE] as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def stream(server, model="mana/long-form", timeout=30):
    return requests.post(server.url + CHAT, json={"model": model, "messages": USER,
                                                  "stream": True},
                         stream=True, timeout=timeout)


def contents(events):
    return [e["choices"][0]["delta"].get("content") for e in events
            if isinstance(e, dict) and e.get("choices")]


@pytest.mark.parametrize("mode, opts", [
    ("status", {"status": 503}),
    ("stream_error", {}),
    ("malformed", {}),
])
def test_stream_falls_back_before_first_chunk(gateway_factory, upstreams, tmp_path,
                                              mode, opts):
    server = start(gateway_factory, upstreams, tmp_path)
    upstreams["ollama"].behave(mode, path="/api/chat", **opts)
    response = stream(server)
    assert response.status_code == 200
    assert response.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.3-70b-versatile"
    events = read_sse(response)
    assert "".join(c or "" for c in contents(events)) == upstreams["groq"].reply_text
    assert {e["model"] for e in events if isinstance(e, dict)} == \
        {"groq/llama-3.3-70b-versatile"}
    assert events[-1] == "[DONE]"


def test_stream_whose_whole_chain_fails_is_a_json_503(
        gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    for name in ("ollama", "groq", "openrouter"):
        upstreams[name].behave("status", status=500, path="chat")
    response = stream(server)
    assert response.status_code == 503
    assert response.json()["detail"]["kind"] == "no_healthy_provider"


def test_stream_dropped_after_3_chunks_ends_with_error_event(
        gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    upstreams["ollama"].behave("drop_after", chunks=3, path="/api/chat")
    response = requests.post(server.url + CHAT, json={"model": "mana/long-form",
                                                      "messages": USER, "stream": True},
                             headers={"X-Request-ID": "dropped-stream"}, stream=True,
                             timeout=30)
    assert response.headers["X-Mana-LLM-Resolved"] == "ollama/gemma3:12b"
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["type"]
    assert len([c for c in contents(events) if c]) == 3
    assert {e["model"] for e in events if isinstance(e, dict) and "model" in e} == \
        {"ollama/gemma3:12b"}
    assert chat_hits(upstreams["groq"]) == 0
    # The failure is logged under the stream's own request id.
    assert wait_until(lambda: re.search(r"\[dropped-stream\] app\.streaming: stream from "
                                        r"ollama/gemma3:12b failed", server.log()), timeout=5)


def test_silent_stream_ends_after_idle_timeout(gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path, STREAM_IDLE_TIMEOUT=1)
    upstreams["ollama"].behave("stall_after", chunks=3, path="/api/chat")
    started = time.monotonic()
    events = read_sse(stream(server))
    elapsed = time.monotonic() - started
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    assert len([c for c in contents(events) if c]) == 3
    assert elapsed < 60  # the stall lasts 120 s: only the 1 s idle timeout ends it early


def test_client_disconnect_closes_upstream(gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    fake = upstreams["ollama"]
    fake.behave("slow_stream", interval=0.1, chunks=200, path="/api/chat")
    response = stream(server)
    lines = response.iter_lines()
    for _ in range(6):
        next(lines)
    response.close()
    assert fake.wait_for(lambda: fake.stream_write_failures >= 1, timeout=10)


def test_streams_that_break_mid_way_trip_the_provider(app_factory, upstreams, tmp_path):
    app = app_factory({"OLLAMA_URL": upstreams["ollama"].url, "FAILURE_THRESHOLD": 2})
    upstreams["ollama"].behave("drop_after", chunks=1, path="/api/chat")
    client = app.test_client()
    for _ in range(2):
        body = client.post(CHAT, json={"model": "qwen2.5:7b", "messages": USER,
                                       "stream": True}).get_data(as_text=True)
        assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
    health = app.extensions["mana_llm"].health.snapshot()["ollama"]
    assert health["status"] == "unhealthy" and health["consecutive_failures"] == 2


def test_a_caller_leaving_a_silent_stream_closes_its_upstream(
        gateway_factory, upstreams, tmp_path):
    server = start(gateway_factory, upstreams, tmp_path)
    fake = upstreams["ollama"]
    fake.behave("stall_after", chunks=3, path="/api/chat")  # then silent for 120 s
    response = stream(server)
    lines = response.iter_lines()
    seen = 0
    while seen < 3:
        line = next(lines)
        seen += line.startswith(b"data: {") and b'"content"' in line
    response.close()
    # The stream idle timeout is 60 s and the stall 120 s: only the watch closes it now.
    assert fake.wait_for(lambda: fake.client_disconnects >= 1, timeout=30)
    for _ in range(6):
        health = requests.get(server.url + "/v1/health").json()["providers"]["ollama"]
        assert (health["status"], health["consecutive_failures"]) == ("healthy", 0)
