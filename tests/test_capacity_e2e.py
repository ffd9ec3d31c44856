"""Capacity caps end to end: real gunicorn (2 workers), the SQLite board and Redis.

The fake Ollama answers slowly, so calls overlap; it counts how many it
is answering at once, which is what a cap promises to bound.
"""

import concurrent.futures
import os
import re
import signal
import sqlite3

import pytest
import requests

from tests.conftest import provider_env, wait_until, write_aliases
from tests.redis_server import redis_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.e2e

LOCAL, CLOUD = "ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"
CHAINS = {"mana/local": [LOCAL, CLOUD]}
USER = [{"role": "user", "content": "hello"}]
CHAT = "/api/chat"


def start(gateway_factory, upstreams, tmp_path, **env):
    full = provider_env(upstreams)
    full["ALIASES_PATH"] = write_aliases(tmp_path / "aliases.yaml", CHAINS, "mana/local")
    full["PROBE_INTERVAL"] = "3600"
    full.update({k: str(v) for k, v in env.items()})
    return gateway_factory(full)


@pytest.fixture
def fakes(fake_factory):
    return {name: fake_factory(name) for name in ("ollama", "groq")}


def ask(server, model="mana/local", stream=False, timeout=30):
    return requests.post(server.url + "/v1/chat/completions", stream=stream, timeout=timeout,
                         json={"model": model, "messages": USER, "stream": stream})


def ask_many(servers, count, model="mana/local"):
    """Send ``count`` calls at once (spread over ``servers``); return their responses."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: ask(servers[i % len(servers)], model), range(count)))


def served_by(responses):
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return sorted(r.headers["X-Mana-LLM-Resolved"] for r in responses)


def ollama_load(server):
    """Return the /v1/health entry of the capped Ollama (inflight, cap, scope)."""
    state = requests.get(server.url + "/v1/health", timeout=15).json()["providers"]["ollama"]
    return {k: state.get(k) for k in ("inflight", "cap", "scope")}


def saturated_skips(server):
    """Return the aggregated mana_llm_fallback_total of Ollama's saturated skips."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    return sum(float(value) for labels, value in re.findall(
        r"^mana_llm_fallback_total\{([^}]*)\} ([0-9.]+)$", text, re.M)
        if f'from_model="{LOCAL}"' in labels and 'reason="saturated"' in labels)


def test_a_cap_of_two_overflows_an_alias_into_the_next_entry(gateway_factory, fakes, tmp_path):
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=2)
    fakes["ollama"].behave("delay", path=CHAT, seconds=3)
    fakes["groq"].behave("delay", seconds=3)
    responses = ask_many([server], 6)
    assert served_by(responses) == [CLOUD] * 4 + [LOCAL] * 2
    assert fakes["ollama"].max_concurrent(CHAT) == 2
    assert fakes["ollama"].hits(CHAT) == 2
    assert saturated_skips(server) == 4
    assert ollama_load(server) == {"inflight": 0, "cap": 2, "scope": "board"}


def test_a_stream_holds_its_slot_until_it_ends(gateway_factory, fakes, tmp_path):
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=1)
    fakes["ollama"].behave("slow_stream", path=CHAT, chunks=20, interval=0.15)
    stream = ask(server, LOCAL, stream=True)
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data:"))  # committed
    assert ollama_load(server)["inflight"] == 1
    # Meanwhile the alias overflows: the stream's slot is still taken.
    assert ask(server).headers["X-Mana-LLM-Resolved"] == CLOUD
    assert b"data: [DONE]" in list(lines)
    assert wait_until(lambda: ollama_load(server)["inflight"] == 0, timeout=5)
    assert ask(server).headers["X-Mana-LLM-Resolved"] == LOCAL


def test_slots_of_a_worker_killed_with_9_come_back(gateway_factory, fakes, tmp_path):
    board = tmp_path / "board.sqlite3"
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=2,
                   SHARED_STATE_URL=f"sqlite:///{board}")
    fakes["ollama"].behave("delay", path=CHAT, seconds=60)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    calls = [pool.submit(ask, server, LOCAL, timeout=90) for _ in range(2)]
    assert wait_until(lambda: fakes["ollama"].concurrent(CHAT) == 2, timeout=10)
    with sqlite3.connect(board) as db:
        owners = {int(owner.split("-")[0]) for owner, in db.execute("SELECT owner FROM slots")}
    assert owners and owners <= set(server.worker_pids())
    for pid in owners:
        os.kill(pid, signal.SIGKILL)
    for call in calls:
        with pytest.raises(requests.RequestException):
            call.result(timeout=30)
    pool.shutdown()
    # Nobody released them: they are leaked until their leases run out.
    assert ollama_load(server)["inflight"] == 2
    assert wait_until(lambda: ollama_load(server)["inflight"] == 0, timeout=30, interval=0.5)
    fakes["ollama"].behave("ok", path=CHAT)
    assert ask(server).headers["X-Mana-LLM-Resolved"] == LOCAL


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_caller_who_leaves_the_queue_costs_no_upstream_call(
        gateway_factory, fakes, tmp_path, stream):
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=1, QUEUE_TIMEOUT=30)
    fakes["ollama"].behave("delay", path=CHAT, seconds=4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = pool.submit(ask, server, LOCAL)
        assert wait_until(lambda: fakes["ollama"].concurrent(CHAT) == 1, timeout=10)
        # Gives up (closes its connection) while the gateway queues it for the slot.
        with pytest.raises(requests.Timeout):
            ask(server, LOCAL, stream=stream, timeout=1)
        assert holder.result().status_code == 200
    fakes["ollama"].behave("ok", path=CHAT)
    # A queued ghost would have taken the freed slot (and run a 4 s generation first).
    assert ask(server, LOCAL).status_code == 200
    assert fakes["ollama"].hits(CHAT) == 2
    assert wait_until(lambda: ollama_load(server)["inflight"] == 0, timeout=10)


def test_a_named_capped_model_waits_for_a_slot(gateway_factory, fakes, tmp_path):
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=1)
    fakes["ollama"].behave("delay", path=CHAT, seconds=2)
    responses = ask_many([server], 3, model=LOCAL)
    assert served_by(responses) == [LOCAL] * 3
    assert fakes["ollama"].max_concurrent(CHAT) == 1


def test_a_named_capped_model_answers_503_saturated_after_queue_timeout(
        gateway_factory, fakes, tmp_path):
    server = start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=1,
                   QUEUE_TIMEOUT=0.3)
    fakes["ollama"].behave("delay", path=CHAT, seconds=4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(ask, server, LOCAL)
        assert wait_until(lambda: fakes["ollama"].concurrent(CHAT) == 1, timeout=10)
        turned_away = ask(server, LOCAL)
        assert first.result().status_code == 200
    assert turned_away.status_code == 503
    assert turned_away.headers["Retry-After"] == "1"
    error = turned_away.json()["error"]
    assert error["type"] == "no_healthy_provider"
    assert error["attempts"] == [{"model": LOCAL, "reason": "saturated"}]
    assert fakes["ollama"].hits(CHAT) == 1


def test_two_instances_on_one_redis_share_a_cap(gateway_factory, fakes, tmp_path,
                                                redis_server):  # noqa: F811
    servers = [start(gateway_factory, fakes, tmp_path, OLLAMA_MAX_CONCURRENCY=2,
                     SHARED_STATE_URL=redis_server.url) for _ in range(2)]
    fakes["ollama"].behave("delay", path=CHAT, seconds=3)
    fakes["groq"].behave("delay", seconds=3)
    responses = ask_many(servers, 6)
    assert served_by(responses) == [CLOUD] * 4 + [LOCAL] * 2
    assert fakes["ollama"].max_concurrent(CHAT) == 2
    assert ollama_load(servers[1]) == {"inflight": 0, "cap": 2, "scope": "board"}
