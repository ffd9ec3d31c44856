"""A malicious upstream cannot grow a worker, pin it, or stop other callers; end to end.

Real gunicorn (2 workers). The abused provider is Groq (a cloud provider,
read timeout ``UPSTREAM_TIMEOUT=5`` here); an alias walks from it to
OpenRouter, and Ollama stands for "another provider" that callers use
meanwhile. The breaker's threshold is set out of reach, so every request
of a scenario reaches the abusive upstream (a trip would hide the abuse).

For each kind of abuse: the entry fails as ``upstream_error`` (its
reason is counted in the metrics and named in the attempts of a direct
request, which has no next entry and so is a 503), an
alias walk is answered by the next entry, requests to Ollama made while
the abuse runs are answered normally, and no worker's RSS passes 300 MiB
(sampled from /proc all along). CPU figures are printed, never asserted.
"""

import json
import os
import re
import threading
import time

import pytest
import requests

from tests.conftest import Gunicorn, provider_env, write_aliases
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]
ABUSED = "groq/llama-3.1-8b-instant"
NEXT = "openrouter/anthropic/claude-3-haiku"
OTHER = "ollama/qwen2.5:7b"
ALIAS = "mana/abuse"
RSS_LIMIT = 300 * 1024 * 1024
ABUSERS = 4          # concurrent abusive requests
ROUNDS = 4           # requests per abuser (each alternates direct and alias)
TICKS = os.sysconf("SC_CLK_TCK")
EMPTY_EVENT = ('data: {"id":"x","object":"chat.completion.chunk","model":"m","choices":'
               '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
               '\n\n')


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Fakes for Groq (abused), OpenRouter (next entry), Ollama (others); one gateway."""
    fakes = {name: FakeUpstream(name=name).start() for name in ("groq", "openrouter", "ollama")}
    tmp = tmp_path_factory.mktemp("abuse")
    env = provider_env(fakes)
    env.update({"ALIASES_PATH": write_aliases(tmp / "aliases.yaml", {ALIAS: [ABUSED, NEXT]}),
                "UPSTREAM_TIMEOUT": "5", "OLLAMA_TIMEOUT": "5", "FAILURE_THRESHOLD": "100000",
                "STREAM_IDLE_TIMEOUT": "30", "GUNICORN_THREADS": "16"})
    server = Gunicorn(env, tmp / "gateway.log")
    try:
        server.start()
        yield server, fakes
    finally:
        server.stop()
        for fake in fakes.values():
            fake.stop()


class Sampler:
    """Sample every worker's RSS (and CPU time) from /proc until stopped."""

    def __init__(self, server):
        self.server = server
        self.peak = {}
        self.cpu_start = self.cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.wait(0.05):
            for pid in self.server.worker_pids():
                rss = vm_rss(pid)
                if rss is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0), rss)

    def cpu(self):
        return {pid: cpu_seconds(pid) for pid in self.server.worker_pids()}

    def cpu_used(self):
        end = self.cpu()
        return sum(end[pid] - self.cpu_start.get(pid, 0.0) for pid in end
                   if end[pid] is not None and self.cpu_start.get(pid) is not None)


def vm_rss(pid):
    """Return the resident size of ``pid`` in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS   # utime + stime


def chat(server, model, stream, timeout=30):
    body = {"model": model, "messages": USER, "stream": stream}
    return requests.post(server.url + CHAT, json=body, timeout=timeout)


def answer_text(response):
    """Return the assistant's text of a chat answer, streamed (SSE) or not."""
    if not response.headers["Content-Type"].startswith("text/event-stream"):
        return response.json()["choices"][0]["message"]["content"]
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n")
              if line.startswith("data: {")]
    assert response.text.endswith("data: [DONE]\n\n")
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))


def errors_counted(server, reason):
    """Return the gateway's count of failed Groq calls with ``reason`` (all workers)."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for labels, value in re.findall(r"^mana_llm_llm_errors_total\{(.*)\} (\S+)$", text, re.M):
        if 'provider="groq"' in labels and f'error_type="{reason}"' in labels:
            total += float(value)
    return total


def run_abuse(server, stream, rounds, outcomes, abusers=ABUSERS):
    """Send ``abusers`` x ``rounds`` abusive requests at once (direct and alias, alternating)."""
    busy = []

    def abuser(number):
        for turn in range(rounds):
            model = ABUSED if (number + turn) % 2 == 0 else ALIAS
            busy.append(1)
            try:
                outcomes.append((model, chat(server, model, stream)))
            except requests.RequestException as exc:  # recorded: the test fails on it
                outcomes.append((model, exc))
            finally:
                busy.pop()

    threads = [threading.Thread(target=abuser, args=(n,)) for n in range(abusers)]
    for thread in threads:
        thread.start()
    return threads, busy


def others_while(server, threads, busy):
    """Ask Ollama over and over while the abuse runs; return (answers, asked during abuse)."""
    answers, during = [], 0
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        abusing = bool(busy)
        response = chat(server, OTHER, stream=False, timeout=30)
        answers.append(response)
        during += abusing and bool(busy)   # an abusive request in flight before and after
        time.sleep(0.05)
    return answers, during


SCENARIOS = {
    # (1) endless content-less events: held back until 1 MiB, then the entry fails
    "empty-events": (dict(mode="flood", frame=EMPTY_EVENT), True, "malformed-response", ROUNDS),
    # (1) endless keep-alive comments: nothing held, the read timeout (5 s) ends the wait
    "keep-alive-comments": (dict(mode="flood", interval=0.2), True, "ReadTimeout", 1),
    # (2) a 400 MB answer body, not streamed: 32 MiB read, then the entry fails
    "400MB-answer": (dict(mode="huge_body"), False, "too-large", ROUNDS),
    # (3) a stream of tens of MB without a newline: one line over 1 MiB fails the entry
    "no-newline": (dict(mode="flood", frame="x" * 1000, size=64 * 1024 * 1024), True,
                   "malformed-response", ROUNDS),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_abusive_upstream_fails_its_entry_and_harms_nobody(rig, scenario):
    behaviour, stream, reason, rounds = SCENARIOS[scenario]
    abuse_and_check(rig, scenario, behaviour, stream, reason, rounds, ABUSERS)


def test_an_answer_of_millions_of_tiny_objects_is_refused_before_it_is_decoded(rig):
    # 31 MiB (under the size limit) of "{}," is ten million dicts once decoded:
    # three such answers at once took a worker to 1.7 GB. One at a time here: four
    # at once still hold 4 x 31 MiB as read, which with the allocator's leftovers
    # comes near the 300 MiB bound by itself (the size limit's own cost).
    behaviour = dict(mode="huge_body", size=31 * 1024 * 1024, filler="{},")
    abuse_and_check(rig, "object-bomb", behaviour, False, "too-large", ROUNDS, 1)


def abuse_and_check(rig, scenario, behaviour, stream, reason, rounds, abusers):
    """Abuse Groq as told; check the entry failed, the walk moved on, others were served."""
    server, fakes = rig
    for fake in fakes.values():
        fake.reset()
    fakes["groq"].behave(path="/chat/completions", **behaviour)
    counted_before = errors_counted(server, reason)
    outcomes = []
    started = time.monotonic()
    with Sampler(server) as sampler:
        threads, busy = run_abuse(server, stream, rounds, outcomes, abusers)
        answers, during = others_while(server, threads, busy)
        for thread in threads:
            thread.join(timeout=90)
    elapsed = time.monotonic() - started

    assert len(outcomes) == abusers * rounds
    for model, response in outcomes:
        assert isinstance(response, requests.Response), f"{model}: {response!r}"
        if model == ALIAS:  # the walk moved on and the caller got the next entry's answer
            assert response.status_code == 200, response.text[:500]
            assert response.headers["X-Mana-LLM-Resolved"] == NEXT
            assert answer_text(response) == "Hello from openrouter"
        else:               # asked directly, the entry's failure is the answer
            assert response.status_code == 503, response.text[:500]
            assert response.json()["error"]["attempts"] == [{"model": ABUSED,
                                                             "reason": reason}]
    assert fakes["groq"].hits("/chat/completions") == abusers * rounds
    assert fakes["openrouter"].hits("/chat/completions") == abusers * rounds // 2
    assert errors_counted(server, reason) - counted_before == abusers * rounds

    assert answers and during >= 1, "no request to another provider ran during the abuse"
    for response in answers:
        assert response.status_code == 200, response.text[:500]
        assert answer_text(response) == "Hello from ollama"

    assert sampler.peak, "no worker RSS was sampled"
    peak = max(sampler.peak.values())
    assert peak < RSS_LIMIT, f"a worker reached {peak / 2**20:.0f} MiB"
    print(f"\n[figure] {scenario}: {abusers * rounds} abusive requests in {elapsed:.1f}s, "
          f"{len(answers)} others answered ({during} during the abuse), worker RSS peak "
          f"{peak / 2**20:.0f} MiB, worker CPU {sampler.cpu_used():.2f}s")
    assert server.alive() and len(server.worker_pids()) == 2
    assert "Traceback" not in server.log()


DEEP = "[" * 100_000 + "]" * 100_000   # deeper than the JSON parser recurses
CONTENT_EVENT = ('data: {"id":"x","object":"chat.completion.chunk","model":"m","choices":'
                 '[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n')


def test_json_nested_too_deep_to_parse_fails_the_entry_not_the_gateway(rig):
    # The parser raises RecursionError for it, not ValueError: it was a 500 that
    # stopped the walk at this entry (and never tripped it), or cut a stream.
    server, fakes = rig
    for fake in fakes.values():
        fake.reset()
    groq = fakes["groq"]
    groq.behave("status", status=200, body=DEEP, path="/chat/completions",
                headers={"Content-Type": "application/json"})
    direct = chat(server, ABUSED, stream=False)
    assert direct.status_code == 503, direct.text[:300]
    assert direct.json()["error"]["attempts"] == [{"model": ABUSED,
                                                   "reason": "malformed-response"}]
    walked = chat(server, ALIAS, stream=False)
    assert (walked.status_code, walked.headers["X-Mana-LLM-Resolved"]) == (200, NEXT)
    groq.behave("status", status=500, body=DEEP, path="/chat/completions",
                headers={"Content-Type": "application/json"})
    assert chat(server, ALIAS, stream=True).headers["X-Mana-LLM-Resolved"] == NEXT
    # After the first content the stream is committed: it ends with an error event.
    groq.behave("flood", frame=CONTENT_EVENT + f"data: {DEEP}\n\n", size=1,
                path="/chat/completions")
    committed = chat(server, ALIAS, stream=True)
    assert committed.headers["X-Mana-LLM-Resolved"] == ABUSED
    assert committed.text.endswith("data: [DONE]\n\n")
    assert '"type":"upstream_error"' in committed.text
    assert groq.hits("/chat/completions") == 4
    assert "Traceback" not in server.log()
