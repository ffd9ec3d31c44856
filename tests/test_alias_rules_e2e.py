"""Alias files naming an unknown provider: refused at check, at start and on HUP."""

import pytest
import requests

from tests.conftest import provider_env, wait_until, write_aliases

pytestmark = pytest.mark.e2e

GOOD = {"mana/fast-text": ["ollama/qwen2.5:7b", "Groq/llama-3.1-8b-instant"]}
TYPO = {"mana/fast-text": ["ollama/qwen2.5:7b", "groc/llama-3.1-8b-instant"]}


def fast_text_chains(server, samples=12):
    """Return the distinct fast-text chains served across requests (both workers)."""
    seen = set()
    for _ in range(samples):
        doc = requests.get(server.url + "/v1/aliases", timeout=5).json()
        seen.add(tuple(next(a["chain"] for a in doc["aliases"]
                            if a["name"] == "mana/fast-text")))
    return seen


def test_unknown_provider_at_start_is_a_startup_error(gateway_factory, upstreams, tmp_path):
    env = provider_env(upstreams)
    env["ALIASES_PATH"] = write_aliases(tmp_path / "aliases.yaml", TYPO)
    server = gateway_factory(env, expect_ready=False)
    assert server.process.wait(timeout=30) != 0
    assert "'mana/fast-text'" in server.log() and "'groc/llama-3.1-8b-instant'" in server.log()


def test_unknown_provider_on_hup_keeps_the_last_good_aliases(gateway_factory, upstreams,
                                                             tmp_path):
    path = tmp_path / "aliases.yaml"
    env = provider_env(upstreams)
    env["ALIASES_PATH"] = write_aliases(path, GOOD)
    server = gateway_factory(env)
    good = {("ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant")}
    assert fast_text_chains(server) == good
    old_workers = set(server.worker_pids())
    write_aliases(path, TYPO)
    server.hup()
    assert wait_until(lambda: "reload rejected" in server.log(), timeout=15), server.log()
    assert "groc" in server.log()
    assert wait_until(lambda: not (set(server.worker_pids()) & old_workers)
                      and len(server.worker_pids()) == 2, timeout=15)
    assert fast_text_chains(server) == good
    # The case-insensitive prefix of the good file is served as groq.
    upstreams["ollama"].behave("status", status=500, path="/api/chat")
    answer = requests.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": "mana/fast-text", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.1-8b-instant"
