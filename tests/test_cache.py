"""The response cache in one process: keys, when it serves, the LRU and the board's stores."""

import pytest

from app.cache import (BYPASS, Entry, ResponseCache, StreamTape, WorkerLRU, as_answer,
                       as_chunks, cache_control, complete_answer, plan_chat, plan_embeddings)
from app.cache_store import RedisCacheStore, SqliteCacheStore, open_cache_store
from app.routing.aliases import parse_aliases, resolve_chain, AliasConfigError
from app.routing.board import BoardUnavailable, GuardedBoard
from app.providers import KNOWN_PROVIDERS
from tests.redis_server import redis_server  # noqa: F401  (a fixture)

TABLE = parse_aliases({"aliases": {
    "mana/structured": {"chain": ["ollama/qwen2.5:7b"], "cache_ttl": 600},
    "mana/shared": {"chain": ["ollama/qwen2.5:7b"], "cache_ttl": 60, "cache_shared": True},
    "mana/plain": {"chain": ["ollama/qwen2.5:7b"]}}})
USER = [{"role": "user", "content": "turn the lights on"}]
CONFIG = {"CACHE_WORKER_BYTES": 1 << 20, "CACHE_MAX_BYTES": 1 << 20,
          "CACHE_MAX_ENTRY_BYTES": 4096, "CACHE_EMBEDDINGS_TTL": 60}


def chat(model="mana/structured", caller="api", header=None, **body):
    body = {"model": model, "messages": USER, **body}
    route = resolve_chain(model, TABLE, KNOWN_PROVIDERS)
    return plan_chat(body, route, TABLE, caller, header)


# --- keys and plans -----------------------------------------------------------------------------

def test_same_request_same_key_whatever_is_left_out():
    assert chat().key == chat(user="u1", stream_options={"include_usage": True}).key
    assert chat().key == chat(stream=True).key  # one answer, served in either shape
    assert chat(temperature=0).key == chat(temperature=0.0).key


@pytest.mark.parametrize("change", [{"temperature": 0}, {"max_tokens": 5}, {"seed": 1},
                                    {"tools": [{"type": "function",
                                                "function": {"name": "f"}}]},
                                    {"response_format": {"type": "json_object"}},
                                    {"messages": USER * 2}])
def test_every_field_that_changes_the_answer_changes_the_key(change):
    assert chat(**change).key != chat().key


def test_a_long_list_without_floats_is_keyed_without_a_walk_item_by_item(monkeypatch):
    import app.cache

    numbers = [[7] * 1000 for _ in range(50)]
    walked = []
    real = app.cache._number
    monkeypatch.setattr(app.cache, "_number", lambda v: walked.append(v) or real(v))
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": numbers}}}
    key = chat(response_format=schema).key
    assert len(walked) < 100   # any caller may send max-age: 50,000 ints must not cost 50,000 calls
    # Floats are still one value with the ints they equal, however deep.
    mixed = [[7.0] + [7] * 999] + numbers[1:]
    schema["json_schema"]["schema"]["enum"] = mixed
    assert chat(response_format=schema).key == key


def test_callers_are_apart_unless_the_alias_shares():
    assert chat(caller="a").key != chat(caller="b").key
    assert chat("mana/shared", caller="a").key == chat("mana/shared", caller="b").key


def test_an_alias_without_ttl_is_bypassed_unless_the_caller_asks():
    assert chat("mana/plain") == BYPASS
    asked = chat("mana/plain", header="max-age=30")
    assert asked.key and asked.ttl == 30 and asked.lookup


def test_cache_control_rules():
    assert chat(header="no-store") == BYPASS
    refresh = chat(header="No-Cache")
    assert refresh.key == chat().key and not refresh.lookup and refresh.ttl == 600
    assert chat(header="max-age=5").max_age == 5 and chat(header="max-age=5").ttl == 600
    assert cache_control('no-cache, max-age="7"') == ({"no-cache"}, 7)
    assert cache_control("max-age=x") == (set(), None)


def test_temperature_above_zero_only_with_max_age():
    assert chat(temperature=0.7) == BYPASS
    assert chat(temperature=0.7, header="max-age=60").key


def test_embeddings_key_ignores_encoding_and_a_lone_string_is_a_list():
    route = resolve_chain("ollama/nomic-embed-text", TABLE, KNOWN_PROVIDERS)
    one = plan_embeddings({"input": "x", "encoding_format": "base64"}, ["x"], route, TABLE,
                          "api", None, 60)
    two = plan_embeddings({"input": ["x"]}, ["x"], route, TABLE, "api", None, 60)
    assert one.key == two.key and one.ttl == 60
    assert plan_embeddings({"input": ["x"]}, ["x"], route, TABLE, "api", "no-store", 60) \
        == BYPASS


@pytest.mark.parametrize("body, message", [
    ({"cache_ttl": 0}, "cache_ttl"), ({"cache_ttl": "60"}, "cache_ttl"),
    ({"cache_ttl": True}, "cache_ttl"),
    ({"cache_ttl": 30 * 86400 + 1}, "cache_ttl"), ({"cache_shared": "yes"}, "cache_shared")])
def test_alias_cache_fields_are_validated(body, message):
    with pytest.raises(AliasConfigError, match=message):
        parse_aliases({"aliases": {"mana/x": {"chain": ["ollama/m"], **body}}})


def test_alias_cache_fields_survive_the_snapshot():
    assert parse_aliases(TABLE.to_doc()) == TABLE


# --- what may be kept ---------------------------------------------------------------------------

@pytest.mark.parametrize("finish, kept", [("stop", True), ("tool_calls", True),
                                          ("length", False), ("content_filter", False),
                                          (None, False)])
def test_only_complete_answers_are_kept(finish, kept):
    assert complete_answer({"choices": [{"finish_reason": finish}]}) is kept


def test_a_tape_keeps_a_complete_stream_only():
    kept = []
    tape = StreamTape(10_000, lambda chunks, usage: kept.append((chunks, usage)))
    tape.add({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]})
    tape.add({"choices": [{"delta": {}, "finish_reason": "length"}]})
    tape.done()
    assert kept == []
    tape = StreamTape(10_000, lambda chunks, usage: kept.append((chunks, usage)))
    tape.add({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    tape.add({"choices": [], "usage": {"prompt_tokens": 1}})
    tape.done()
    assert kept[0][1] == {"prompt_tokens": 1} and len(kept[0][0]) == 2


# --- the LRU and the cache ----------------------------------------------------------------------

def test_lru_stays_under_its_bound_and_drops_the_least_recent():
    lru = WorkerLRU(100)
    lru.put("a", b"x" * 40, 10)
    lru.put("b", b"x" * 40, 10)
    assert lru.get("a", 0)  # a is now the most recent
    lru.put("c", b"x" * 40, 10)
    assert lru.bytes <= 100 and lru.get("b", 0) is None and lru.get("a", 0)
    assert lru.get("a", 11) is None  # expired


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_keeps_until_ttl_and_not_past_the_entry_bound():
    clock = Clock()
    cache = ResponseCache(CONFIG, wall=clock)
    plan = chat()
    assert cache.lookup(plan) is None
    assert cache.keep(plan, "answer", {"x": 1}, "ollama/qwen2.5:7b", {})
    clock.now += 599
    hit = cache.lookup(plan)
    assert hit.data == {"x": 1} and hit.age(clock.now) == 599
    clock.now += 2
    assert cache.lookup(plan) is None
    assert not cache.keep(plan, "answer", {"x": "y" * 5000}, "ollama/qwen2.5:7b", {})


@pytest.mark.parametrize("kind, data, fits", [
    ("vectors", {"vectors": [[0.5] * 600] * 2, "prompt_tokens": 2}, False),
    ("vectors", {"vectors": [[0.5] * 10] * 2, "prompt_tokens": 2}, True),
    ("answer", {"choices": [{"message": {"content": "y" * 5000}}]}, False),
    ("answer", {"choices": [{"message": {"content": "yes"}}]}, True),
])
def test_an_entry_that_cannot_fit_is_refused_before_it_is_encoded(
        monkeypatch, kind, data, fits):
    encoded = []
    real = Entry.encode
    monkeypatch.setattr(Entry, "encode", lambda self: encoded.append(1) or real(self))
    cache = ResponseCache(CONFIG, wall=Clock())
    assert cache.keep(chat(), kind, data, "ollama/nomic-embed-text", {}) is fits
    assert bool(encoded) is fits   # 2 x 600 floats take >= 4,800 bytes: no need to encode


class DeadStore:
    name = "dead"

    def get(self, key):
        raise BoardUnavailable("down")

    put = check = get

    def close(self):
        pass


def test_a_dead_store_means_misses_and_store_errors_never_exceptions():
    counted = []

    class Recorder:
        def cache_result(self, result):
            counted.append(result)

        def cache_bytes(self, store, size):
            pass

    cache = ResponseCache(CONFIG, GuardedBoard(DeadStore()), Recorder())
    plan = chat()
    assert cache.lookup(plan) is None
    assert not cache.keep(plan, "answer", {"x": 1}, "ollama/m", {})
    assert counted == ["miss", "store_error"]
    assert cache.lookup(plan).data == {"x": 1}  # the worker's own LRU still serves


def test_entries_that_are_not_ours_are_misses():
    assert Entry.decode(b"not json") is None and Entry.decode(b"{}") is None


# --- the board's stores -------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteCacheStore(str(tmp_path / "board.sqlite3.cache"))
        yield made
        made.close()
        return
    server = request.getfixturevalue("redis_server")
    made = RedisCacheStore(server.url, "test:", timeout=1.0)
    yield made
    made.close()


def test_store_keeps_and_expires(store):
    import time

    now = time.time()
    store.put("k", b"value", now + 60, 1000)
    store.put("old", b"value", now - 1, 1000)
    assert store.get("k") == b"value"
    assert store.get("old") is None and store.get("missing") is None


def test_store_stays_under_its_bound_after_10000_distinct_puts(store):
    import time

    now, bound = time.time(), 200_000
    for i in range(10_000):
        total = store.put(f"key-{i}", b"x" * (50 + i % 100), now + 3600 + i, bound)
        assert total <= bound
    assert store.get("key-9999") is not None  # the newest survive
    assert store.get("key-0") is None         # the oldest went first


def test_open_cache_store_follows_the_board():
    assert open_cache_store({"SHARED_STATE_URL": "memory", "CACHE_MAX_BYTES": 1}) is None
    assert open_cache_store({"SHARED_STATE_URL": "", "CACHE_MAX_BYTES": 1}, environ={}) is None
    found = open_cache_store({"SHARED_STATE_URL": "sqlite:///tmp/x", "CACHE_MAX_BYTES": 1})
    assert found.backend.path == "/tmp/x.cache"


def test_every_redis_key_of_the_cache_has_a_ttl(redis_server):  # noqa: F811
    import time

    import redis

    store = RedisCacheStore(redis_server.url, "ttl:", timeout=1.0)
    now = time.time()
    for i in range(5):
        store.put(f"k{i}", b"v" * 10, now + 60 + i, 35)   # room for three
    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys("ttl:*")
    assert len(keys) == 3 + 3  # three entries, the index, the sizes and the total
    assert all(0 < client.pttl(key) <= 125_000 for key in keys)
    assert int(client.get("ttl:cache:bytes")) == 30
    store.close()


class FakeStore:
    name = "fake"

    def __init__(self):
        self.entries = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, raw, expires, max_bytes):
        self.entries[key] = raw
        return sum(map(len, self.entries.values()))

    def check(self):
        pass

    def close(self):
        pass


def test_a_worker_asks_the_board_when_its_own_entry_is_too_old_for_the_caller():
    clock, board = Clock(), GuardedBoard(FakeStore())
    mine = ResponseCache(CONFIG, board, wall=clock)
    theirs = ResponseCache(CONFIG, board, wall=clock)
    mine.keep(chat(), "answer", {"v": "old"}, "ollama/m", {})
    clock.now += 100
    theirs.keep(chat(header="no-cache"), "answer", {"v": "new"}, "ollama/m", {})
    assert mine.lookup(chat()).data == {"v": "old"}          # its own, still within the TTL
    assert mine.lookup(chat(header="max-age=10")).data == {"v": "new"}  # the board's


TOOL_ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
               "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                            "message": {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}}]}}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
TEXT_ANSWER = {**TOOL_ANSWER, "choices": [{"index": 0, "finish_reason": "stop",
                                           "logprobs": None,
                                           "message": {"role": "assistant",
                                                       "content": "Hello there"}}]}


@pytest.mark.parametrize("answer", [TOOL_ANSWER, TEXT_ANSWER], ids=["tool-call", "text"])
def test_a_kept_answer_round_trips_through_chunks(answer):
    assert as_answer(as_chunks(answer)) == answer


def test_streamed_tool_call_deltas_add_up_to_one_call():
    chunks = [{"id": "c", "created": 1, "model": "m", "choices": [{"delta": {"tool_calls": [
        {"index": 0, "id": "call_9", "type": "function",
         "function": {"name": "f", "arguments": ""}}]}}]},
              {"choices": [{"delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": '{"a": '}}]}}]},
              {"choices": [{"delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": "1}"}}]}}]},
              {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}]
    answer = as_answer(chunks)
    assert answer["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and answer["id"] == "c"
