"""The response cache end to end under real gunicorn (2 workers): the fakes count upstream calls.

One gateway on the default SQLite board serves most tests (each asks its
own question, so their entries never meet); the Redis test starts two
instances on one Redis. Which worker answered comes from the
``X-Mana-LLM-Worker`` header.
"""

import base64
import json
import struct

import pytest
import requests
import yaml

from app.callers import hash_key
from tests.conftest import WEATHER_TOOL, Gunicorn, provider_env, wait_until
from tests.fake_upstream import FakeUpstream
from tests.redis_server import redis_server  # noqa: F401  (a fixture)
from tests.test_callers_e2e import metric, wait_for_room_in_the_minute

pytestmark = pytest.mark.e2e

KEYS = {"api": "api-key-cache", "batch": "batch-key-cache", "limited": "limited-key-cache",
        "local": "local-key-cache"}
ALIASES = {"default": "mana/structured", "aliases": {
    "mana/structured": {"description": "cached", "cache_ttl": 600,
                        "chain": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"]},
    "mana/shared": {"description": "shared", "cache_ttl": 600, "cache_shared": True,
                    "chain": ["ollama/qwen2.5:7b"]},
    "mana/fast-text": {"description": "not cached", "chain": ["ollama/qwen2.5:7b"]}}}
CALLERS = {"callers": [
    {"name": "api", "keys": [hash_key(KEYS["api"])]},
    {"name": "batch", "keys": [hash_key(KEYS["batch"])]},
    {"name": "limited", "keys": [hash_key(KEYS["limited"])],
     "limits": {"requests_per_minute": 3}},
    {"name": "local", "keys": [hash_key(KEYS["local"])], "models": ["ollama/*"]}]}
BOARD_BYTES, WORKER_BYTES = 60_000, 20_000


def write_files(directory):
    (directory / "aliases.yaml").write_text(yaml.safe_dump(ALIASES))
    (directory / "keys.yaml").write_text(yaml.safe_dump(CALLERS))
    return {"ALIASES_PATH": str(directory / "aliases.yaml"),
            "KEYS_PATH": str(directory / "keys.yaml"), "PROBE_INTERVAL": "3600"}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One gateway (default SQLite board, small byte bounds) and its two fake upstreams."""
    directory = tmp_path_factory.mktemp("cache")
    fakes = {name: FakeUpstream(name=name).start() for name in ("ollama", "groq")}
    env = {**provider_env(fakes), **write_files(directory),
           "CACHE_MAX_BYTES": str(BOARD_BYTES), "CACHE_WORKER_BYTES": str(WORKER_BYTES),
           # The failures these tests cause add up on the board: none may trip a provider.
           "FAILURE_THRESHOLD": "100"}
    server = Gunicorn(env, directory / "gateway.log")
    try:
        server.start()
        server.fakes = fakes
        yield server
    finally:
        server.stop()
        for fake in fakes.values():
            fake.stop()


@pytest.fixture
def gw(cached):
    for fake in cached.fakes.values():
        fake.reset()
    return cached


def chat(server, text, key="api", headers=None, model="mana/structured", **body):
    """Ask over a fresh connection (so either worker may answer)."""
    headers = {"Authorization": f"Bearer {KEYS[key]}", **(headers or {})}
    body = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    with requests.Session() as session:
        return session.post(server.url + "/v1/chat/completions", json=body, headers=headers,
                            timeout=30)


def ollama_calls(server):
    return server.fakes["ollama"].hits("/api/chat")


def sdk(server, key="api"):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[key], max_retries=0,
                         timeout=30)


# --- hits -------------------------------------------------------------------------------------

def test_second_identical_request_is_served_by_either_worker_with_no_upstream_call(gw):
    first = chat(gw, "classify: lights on", response_format={"type": "json_object"})
    assert first.status_code == 200 and first.headers["X-Mana-LLM-Cache"] == "miss"
    assert ollama_calls(gw) == 1
    hits, workers = [], set()
    while len(hits) < 60 and len(workers) < 2:
        hit = chat(gw, "classify: lights on", response_format={"type": "json_object"})
        hits.append(hit)
        workers.add(hit.headers["X-Mana-LLM-Worker"])
    assert len(workers) == 2, "both workers served hits"
    assert ollama_calls(gw) == 1  # zero upstream calls for every hit
    for hit in hits:
        assert hit.status_code == 200 and hit.headers["X-Mana-LLM-Cache"] == "hit"
        assert hit.headers["X-Mana-LLM-Resolved"] == first.headers["X-Mana-LLM-Resolved"]
        assert 0 <= int(hit.headers["Age"]) <= 60
        assert hit.json() == first.json()  # the original body, its usage and id included
    assert metric(gw, "mana_llm_cache_requests_total", result="hit") >= len(hits)
    assert metric(gw, "mana_llm_cache_saved_tokens_total", type="prompt") >= \
        len(hits) * first.json()["usage"]["prompt_tokens"]
    assert 0 < metric(gw, "mana_llm_cache_bytes", store="board") <= BOARD_BYTES


def test_an_alias_without_ttl_is_not_cached_unless_the_caller_asks(gw):
    for _ in range(2):
        answer = chat(gw, "uncached question", model="mana/fast-text")
        assert answer.headers["X-Mana-LLM-Cache"] == "bypass"
    assert ollama_calls(gw) == 2
    asked = [chat(gw, "asked to cache", model="mana/fast-text",
                  headers={"Cache-Control": "max-age=60"}) for _ in range(2)]
    assert [a.headers["X-Mana-LLM-Cache"] for a in asked] == ["miss", "hit"]
    assert ollama_calls(gw) == 3


def test_sampled_chat_is_not_cached_and_no_store_bypasses(gw):
    for _ in range(2):
        assert chat(gw, "sampled", temperature=0.9).headers["X-Mana-LLM-Cache"] == "bypass"
        chat(gw, "never kept", headers={"Cache-Control": "no-store"})
    assert ollama_calls(gw) == 4


@pytest.mark.parametrize("tools, include_usage", [(False, True), (True, False), (True, True)],
                         ids=["text-with-usage", "tool-call", "tool-call-with-usage"])
def test_a_streamed_hit_parses_exactly_like_the_original(gw, tools, include_usage):
    client = sdk(gw)
    ask = {"model": "mana/structured", "stream": True,
           "messages": [{"role": "user", "content": f"stream me {tools} {include_usage}"}]}
    if tools:
        ask["tools"] = [WEATHER_TOOL]
    if include_usage:
        ask["stream_options"] = {"include_usage": True}
    runs = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ask)
        runs.append((raw.headers.get("X-Mana-LLM-Cache"),
                     [chunk.model_dump() for chunk in raw.parse()]))
    assert [run[0] for run in runs] == ["miss", "hit"]
    assert ollama_calls(gw) == 1
    live, replayed = runs[0][1], runs[1][1]
    assert replayed == live  # ids, content, tool calls, finish_reason, usage: all the same
    finishes = [c["choices"][0]["finish_reason"] for c in live if c["choices"]]
    assert finishes[-1] == ("tool_calls" if tools else "stop")
    assert any(c.get("usage") for c in live) is include_usage


def test_a_kept_stream_answers_a_plain_request_and_a_kept_answer_a_stream(gw):
    client = sdk(gw)
    ask = {"model": "mana/structured", "tools": [WEATHER_TOOL],
           "messages": [{"role": "user", "content": "either shape"}]}
    raw = client.chat.completions.with_raw_response.create(stream=True, **ask)
    streamed = list(raw.parse())
    plain = client.chat.completions.with_raw_response.create(**ask)
    assert (raw.headers["X-Mana-LLM-Cache"], plain.headers["X-Mana-LLM-Cache"]) == \
        ("miss", "hit")
    message = plain.parse().choices[0].message
    first = streamed[0].choices[0].delta.tool_calls[0]
    assert message.tool_calls[0].id == first.id and \
        message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert plain.parse().choices[0].finish_reason == "tool_calls"

    text_ask = {"model": "mana/structured",
                "messages": [{"role": "user", "content": "plain first"}]}
    live = client.chat.completions.create(**text_ask)
    raw = client.chat.completions.with_raw_response.create(
        stream=True, stream_options={"include_usage": True}, **text_ask)
    assert raw.headers["X-Mana-LLM-Cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == live.choices[0].message.content and chunks[0].id == live.id
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.model_dump() == live.usage.model_dump()
    assert ollama_calls(gw) == 2


def test_no_cache_refreshes_the_entry(gw):
    fake = gw.fakes["ollama"]
    fake.reply_text = "first answer"
    assert chat(gw, "refresh me").headers["X-Mana-LLM-Cache"] == "miss"
    fake.reply_text = "second answer"
    hit = chat(gw, "refresh me")
    assert hit.headers["X-Mana-LLM-Cache"] == "hit"
    assert "first answer" in hit.json()["choices"][0]["message"]["content"]
    fresh = chat(gw, "refresh me", headers={"Cache-Control": "no-cache"})
    assert fresh.headers["X-Mana-LLM-Cache"] == "miss"
    assert "second answer" in fresh.json()["choices"][0]["message"]["content"]
    assert ollama_calls(gw) == 2
    # Then hits again, of the fresh answer, on whichever worker (new connections).
    for _ in range(6):
        again = chat(gw, "refresh me")
        assert again.headers["X-Mana-LLM-Cache"] == "hit"
        if again.headers["X-Mana-LLM-Worker"] == fresh.headers["X-Mana-LLM-Worker"]:
            assert "second answer" in again.json()["choices"][0]["message"]["content"]
    assert ollama_calls(gw) == 2


# --- callers ----------------------------------------------------------------------------------

def test_callers_do_not_share_entries_unless_the_alias_says_so(gw):
    assert chat(gw, "tenant", key="api").headers["X-Mana-LLM-Cache"] == "miss"
    assert chat(gw, "tenant", key="batch").headers["X-Mana-LLM-Cache"] == "miss"
    assert chat(gw, "tenant", key="api").headers["X-Mana-LLM-Cache"] == "hit"
    assert ollama_calls(gw) == 2
    assert chat(gw, "shared", key="api", model="mana/shared").headers["X-Mana-LLM-Cache"] \
        == "miss"
    assert chat(gw, "shared", key="batch", model="mana/shared").headers["X-Mana-LLM-Cache"] \
        == "hit"
    assert ollama_calls(gw) == 3


def test_a_hit_still_passes_the_callers_rules(gw):
    assert chat(gw, "rules", key="api").status_code == 200
    forbidden = chat(gw, "rules", key="local")
    assert forbidden.status_code == 403 and "X-Mana-LLM-Cache" not in forbidden.headers
    wait_for_room_in_the_minute(10)
    answers = [chat(gw, "counted", key="limited") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]  # hits count as requests
    assert [a.headers.get("X-Mana-LLM-Cache") for a in answers[:3]] == ["miss", "hit", "hit"]
    assert ollama_calls(gw) == 2


# --- what is never kept -----------------------------------------------------------------------

def test_a_failed_answer_is_never_replayed(gw):
    for fake in gw.fakes.values():
        fake.behave("status", status=500, times=1)
    assert chat(gw, "fails once").status_code == 503
    answer = chat(gw, "fails once")
    assert answer.status_code == 200 and answer.headers["X-Mana-LLM-Cache"] == "miss"
    assert ollama_calls(gw) == 2


def test_a_broken_stream_is_never_replayed(gw):
    gw.fakes["ollama"].behave("drop_after", chunks=1, times=1)
    broken = chat(gw, "breaks mid-way", stream=True)
    assert '"error"' in broken.text  # the stream started, then broke
    again = chat(gw, "breaks mid-way", stream=True)
    assert again.headers["X-Mana-LLM-Cache"] == "miss" and '"error"' not in again.text
    assert ollama_calls(gw) == 2
    assert chat(gw, "breaks mid-way", stream=True).headers["X-Mana-LLM-Cache"] == "hit"


def test_a_truncated_answer_is_never_replayed(gw):
    for _ in range(2):
        answer = chat(gw, "a long question with many words", max_tokens=2)
        assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert ollama_calls(gw) == 2


# --- embeddings and bounds --------------------------------------------------------------------

def embed(server, text, **body):
    return requests.post(server.url + "/v1/embeddings", timeout=30,
                         headers={"Authorization": f"Bearer {KEYS['api']}"},
                         json={"model": "ollama/nomic-embed-text", "input": text, **body})


def test_embeddings_are_cached_and_encoded_per_request(gw):
    first = embed(gw, "embed me")
    second = embed(gw, ["embed me"], encoding_format="base64")
    assert first.headers["X-Mana-LLM-Cache"] == "miss"
    assert second.headers["X-Mana-LLM-Cache"] == "hit"
    assert gw.fakes["ollama"].hits("/api/embed") == 1
    vector = first.json()["data"][0]["embedding"]
    packed = base64.b64decode(second.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(vector)}f", packed)) == vector
    assert second.json()["usage"] == first.json()["usage"]


def test_the_stores_stay_under_their_byte_bounds(gw):
    gw.fakes["ollama"].reply_text = "word " * 600     # about 3 KB an answer
    for i in range(40):                                # about 120 KB in all
        assert chat(gw, f"bulk {i}").status_code == 200
    assert 0 < metric(gw, "mana_llm_cache_bytes", store="board") <= BOARD_BYTES
    assert 0 < metric(gw, "mana_llm_cache_bytes", store="worker") <= WORKER_BYTES
    assert chat(gw, "bulk 39").headers["X-Mana-LLM-Cache"] == "hit"  # the newest stay


# --- a fleet on Redis -------------------------------------------------------------------------

def test_two_instances_on_one_redis_share_hits_and_a_dead_redis_costs_misses(
        gateway_factory, fake_factory, tmp_path, redis_server):  # noqa: F811
    fakes = {name: fake_factory(name) for name in ("ollama", "groq")}
    env = {**provider_env(fakes), **write_files(tmp_path),
           "SHARED_STATE_URL": redis_server.url, "SHARED_STATE_PREFIX": "e2e-cache:"}
    first, second = gateway_factory(env), gateway_factory(env)
    first.fakes = second.fakes = fakes
    assert chat(first, "fleet").headers["X-Mana-LLM-Cache"] == "miss"
    assert chat(second, "fleet").headers["X-Mana-LLM-Cache"] == "hit"
    assert ollama_calls(first) == 1
    redis_server.kill()
    answers = [chat(server, f"after redis {i % 3}") for i in range(12)
               for server in (first, second)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert ollama_calls(first) > 1  # misses, each answered upstream
    assert wait_until(lambda: metric(second, "mana_llm_cache_requests_total",
                                     result="store_error") >= 1, timeout=5)
