"""``kill -HUP`` reloads of aliases.yaml under real gunicorn with 2 workers."""

import os
import signal
import threading

import pytest
import requests

from tests.conftest import provider_env, wait_until, write_aliases

pytestmark = pytest.mark.e2e

OLD = {"mana/fast-text": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"]}
NEW = {"mana/fast-text": ["groq/llama-3.1-8b-instant", "ollama/qwen2.5:7b"],
       "mana/extra": ["openrouter/anthropic/claude-3-haiku"]}


@pytest.fixture
def reloadable(gateway_factory, upstreams, tmp_path):
    path = tmp_path / "aliases.yaml"
    write_aliases(path, OLD, "mana/fast-text")
    env = provider_env(upstreams)
    env["ALIASES_PATH"] = str(path)
    server = gateway_factory(env)
    server.aliases_path = path
    return server


def chains_seen(server, samples=30):
    """Return the distinct fast-text chains served across many requests (both workers)."""
    seen = set()
    for _ in range(samples):
        doc = requests.get(server.url + "/v1/aliases", timeout=5).json()
        seen.add(tuple(next(a["chain"] for a in doc["aliases"]
                            if a["name"] == "mana/fast-text")))
    return seen


def test_valid_edit_is_served_by_every_worker_within_5s(reloadable):
    write_aliases(reloadable.aliases_path, NEW, "mana/fast-text")
    reloadable.hup()
    expected = {tuple(NEW["mana/fast-text"])}
    assert wait_until(lambda: chains_seen(reloadable, 10) == expected, timeout=5)
    assert chains_seen(reloadable) == expected
    answer = requests.post(reloadable.url + "/v1/chat/completions", json={
        "model": "mana/extra", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.headers["X-Mana-LLM-Resolved"] == "openrouter/anthropic/claude-3-haiku"


@pytest.mark.parametrize("breakage", ["not-yaml", "rule", "deleted"])
def test_broken_file_keeps_last_good_aliases(reloadable, breakage):
    if breakage == "not-yaml":
        reloadable.aliases_path.write_text("aliases: [unclosed\n  - {\n")
        expected_log = "not valid YAML"
    elif breakage == "rule":
        reloadable.aliases_path.write_text("aliases:\n  fast-text:\n    chain: [ollama/x]\n")
        expected_log = "must start with 'mana/'"
    else:
        os.unlink(reloadable.aliases_path)
        expected_log = "cannot read"
    old_workers = set(reloadable.worker_pids())
    reloadable.hup()
    assert wait_until(lambda: expected_log in reloadable.log(), timeout=10), reloadable.log()
    assert "reload rejected, keeping the last good" in reloadable.log()
    # gunicorn replaces the workers on HUP; the new ones must still serve the old chain.
    assert wait_until(lambda: not (set(reloadable.worker_pids()) & old_workers)
                      and len(reloadable.worker_pids()) == 2, timeout=15)
    assert chains_seen(reloadable) == {tuple(OLD["mana/fast-text"])}
    victim = reloadable.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in reloadable.worker_pids()
                      and len(reloadable.worker_pids()) == 2, timeout=15)
    assert chains_seen(reloadable) == {tuple(OLD["mana/fast-text"])}
    assert reloadable.alive()


def test_bad_file_at_first_start_is_a_startup_error(gateway_factory, upstreams, tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("aliases:\n  mana/x:\n    chain: []\n")
    env = provider_env(upstreams)
    env["ALIASES_PATH"] = str(path)
    server = gateway_factory(env, expect_ready=False)
    assert server.process.wait(timeout=30) != 0
    assert "mana/x" in server.log() and "chain must be a non-empty list" in server.log()


def test_bad_config_value_at_start_names_the_variable(gateway_factory, upstreams):
    env = provider_env(upstreams)
    env["CONNECT_TIMEOUT"] = "soon"
    server = gateway_factory(env, expect_ready=False)
    assert server.process.wait(timeout=30) != 0
    assert "CONNECT_TIMEOUT" in server.log()


def test_steady_load_across_three_reloads_sees_no_failure(reloadable, upstreams):
    upstreams["ollama"].behave("delay", seconds=0.3, path="/api/chat")
    stop = threading.Event()
    results = []

    def load():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(reloadable.url + "/v1/chat/completions", json={
                    "model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}],
                    "stream": len(results) % 2 == 0}, timeout=30)
                # A stream that broke mid-way would still be a 200: look inside.
                broken = '"error"' in response.text or "[DONE]" not in response.text \
                    and response.headers.get("Content-Type", "").startswith("text/event")
                results.append("broken stream" if broken else response.status_code)
            except requests.RequestException as exc:
                results.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(3):
            chains = NEW if round_ % 2 == 0 else OLD
            write_aliases(reloadable.aliases_path, chains, "mana/fast-text")
            before = len(results)
            reloadable.hup()
            assert wait_until(lambda: chains_seen(reloadable, 6)
                              == {tuple(chains["mana/fast-text"])}, timeout=10)
            assert wait_until(lambda: len(results) > before + 8, timeout=20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    failures = [r for r in results if r != 200]
    assert len(results) > 30
    assert failures == []
