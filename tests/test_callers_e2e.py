"""Callers end to end under real gunicorn: keys, models, quotas on the board, usage, cost.

Two callers: ``api`` (models ``mana/*`` and ``ollama/*``, 60 requests a
minute) and ``batch`` (any model, no limits), plus ``admin`` (named by
ADMIN_KEY_NAME). Windows are whole UTC minutes, so a test that fills a
minute first waits (polling the clock, at most 20 s) until the minute has
enough of it left. Which worker served a request comes from its access line.
"""

import concurrent.futures
import re
import threading
import time

import pytest
import requests
import yaml

from app.callers import hash_key
from tests.conftest import provider_env, wait_until, write_aliases
from tests.redis_server import redis_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "hello there"}]
CHAINS = {"mana/fast-text": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"]}
API, BATCH, ADMIN, NEW_API = "api-key-one", "batch-key-one", "admin-key-one", "api-key-two"
PRICES = {"defaults": {"ollama": {"prompt": 0, "completion": 0}},
          "models": {"groq/llama-3.1-8b-instant": {"prompt": 2.0, "completion": 4.0}}}


def callers_doc(api_keys=(API,), limits=None):
    limits = {"requests_per_minute": 60} if limits is None else limits
    return {"callers": [
        {"name": "api", "keys": [hash_key(k) for k in api_keys],
         "models": ["mana/*", "ollama/*"], "limits": limits},
        {"name": "batch", "keys": [hash_key(BATCH)]},
        {"name": "admin", "keys": [hash_key(ADMIN)]},
    ]}


def write_keys(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def fakes(fake_factory):
    return {name: fake_factory(name) for name in ("ollama", "groq")}


@pytest.fixture
def start(gateway_factory, fakes, tmp_path):
    """Start a gateway with the key file, prices and aliases of this module."""

    def launch(expect_ready=True, **env):
        full = provider_env(fakes)
        full["ALIASES_PATH"] = write_aliases(tmp_path / "aliases.yaml", CHAINS,
                                             "mana/fast-text")
        full["PRICES_PATH"] = str(tmp_path / "prices.yaml")
        (tmp_path / "prices.yaml").write_text(yaml.safe_dump(PRICES))
        keys = tmp_path / "keys.yaml"
        if not keys.exists():
            write_keys(keys, callers_doc())
        full.update(KEYS_PATH=str(keys), ADMIN_KEY_NAME="admin", PROBE_INTERVAL="3600")
        full.update({k: str(v) for k, v in env.items()})
        server = gateway_factory(full, expect_ready=expect_ready)
        server.keys_path = keys
        return server

    return launch


def chat(server, key, model="mana/fast-text", request_id=None, session=requests, **body):
    headers = {"Authorization": f"Bearer {key}"}
    if request_id:
        headers["X-Request-ID"] = request_id
    return session.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                        json={"model": model, "messages": USER, **body})


def workers_of(server, request_ids):
    """Return {request_id: worker pid} from the access lines."""
    found = {}
    for match in re.finditer(r"\[(\d+)\] \[([\w.:-]+)\] app\.access", server.log()):
        if match.group(2) in request_ids:
            found[match.group(2)] = int(match.group(1))
    return found


def metric(server, name, **labels):
    """Return the sum of a metric's samples whose labels include ``labels``."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_for_room_in_the_minute(seconds_needed=20):
    """Wait (at most a minute's tail) until the current UTC minute has enough left."""
    assert wait_until(lambda: time.time() % 60 < 60 - seconds_needed, timeout=seconds_needed + 1)


def fill_minute(servers, count, prefix):
    """Send ``count`` requests of ``api`` over fresh connections, spread over ``servers``."""
    ids = [f"{prefix}-{i}" for i in range(count)]

    def one(index):
        return chat(servers[index % len(servers)], API, request_id=ids[index]).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(count)))
    return ids, statuses


def assert_quota_429(response):
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"]["type"] == "rate_limit" and body["detail"]["reason"] == "quota"
    assert body["detail"]["limit"] == "requests_per_minute"
    assert response.headers["x-should-retry"] == "true"
    left = 60 - time.time() % 60
    # Until the minute frees: never more than a minute, and about what is left of it.
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert abs(int(response.headers["Retry-After"]) - left) <= 3


# --- keys and models ------------------------------------------------------------------------

def test_keys_models_and_the_access_line(start, fakes):
    server = start()
    assert chat(server, "not-a-key").status_code == 401
    assert chat(server, API, model="ollama/qwen2.5:7b").status_code == 200
    forbidden = chat(server, API, model="groq/llama-3.1-8b-instant", request_id="forbidden-1")
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "forbidden"
    assert fakes["groq"].hits("/chat/completions") == 0  # refused before any upstream call
    answer = chat(server, BATCH, model="groq/llama-3.1-8b-instant", request_id="batch-1")
    assert answer.status_code == 200 and fakes["groq"].hits("/chat/completions") == 1
    log = server.log()
    assert re.search(r"\[forbidden-1\] app\.access: POST /v1/chat/completions 403 .* "
                     r"caller=api$", log, re.M), log
    assert re.search(r"\[batch-1\] app\.access: .* caller=batch$", log, re.M)
    assert API not in log and BATCH not in log and hash_key(API) not in log
    assert metric(server, "mana_llm_caller_requests_total", caller="api", status="403") == 1


def test_a_bad_key_file_at_first_start_is_a_startup_error(start, tmp_path):
    (tmp_path / "keys.yaml").write_text("callers:\n  - name: Bad Name\n    keys: []\n")
    server = start(expect_ready=False)
    assert server.process.wait(timeout=30) != 0
    assert "caller 'Bad Name': name must match" in server.log()


# --- quotas on the board --------------------------------------------------------------------

def test_the_61st_request_in_a_minute_is_429_across_both_workers(start, fakes):
    server = start()  # the default board: SQLite shared by the instance's workers
    wait_for_room_in_the_minute()
    ids, statuses = fill_minute([server], 60, "fill")
    assert statuses == [200] * 60
    assert len(set(workers_of(server, ids).values())) == 2  # both workers counted
    assert_quota_429(chat(server, API))
    assert fakes["ollama"].hits("/api/chat") == 60  # the refused one never went upstream
    # Another caller is not held back by api's quota.
    assert chat(server, BATCH).status_code == 200
    usage = requests.get(server.url + "/v1/usage", headers={"X-API-Key": API}, timeout=5)
    [mine] = usage.json()["callers"]
    assert mine["caller"] == "api" and mine["shared"] is True
    assert mine["minute"]["requests"] == 60 and mine["limits"] == {"requests_per_minute": 60}
    assert metric(server, "mana_llm_quota_rejections_total", caller="api",
                  limit="requests_per_minute") == 1


def test_two_instances_on_one_redis_share_the_quota(start, fakes, redis_server):  # noqa: F811
    env = {"SHARED_STATE_URL": redis_server.url, "SHARED_STATE_PREFIX": "e2e-quota:"}
    first, second = start(**env), start(**env)
    wait_for_room_in_the_minute()
    _, statuses = fill_minute([first, second], 60, "redis")
    assert statuses == [200] * 60
    assert_quota_429(chat(first, API))
    assert_quota_429(chat(second, API))
    import redis

    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys("e2e-quota:count:*")
    assert keys and all(client.ttl(k) > 0 for k in keys)  # every counter expires
    client.close()


def test_a_dead_board_blocks_no_caller_and_each_worker_takes_its_share(
        start, redis_server):  # noqa: F811
    server = start(SHARED_STATE_URL=redis_server.url, SHARED_STATE_PREFIX="e2e-dead:")
    wait_for_room_in_the_minute()
    redis_server.kill()
    ids, statuses = fill_minute([server], 20, "dead")
    assert statuses == [200] * 20  # the board is gone; callers are not held up
    usage = requests.get(server.url + "/v1/usage", headers={"X-API-Key": API}, timeout=5)
    assert usage.json()["callers"][0]["shared"] is False
    # Each of the 2 workers now allows 60 / 2 = 30 of api's requests this minute.
    more_ids, more = fill_minute([server], 50, "dead-more")
    assert set(more) == {200, 429} and more.count(429) >= 10
    status = dict(zip(ids + more_ids, statuses + more))
    served = {}
    for request_id, pid in workers_of(server, ids + more_ids).items():
        served.setdefault(pid, []).append(status[request_id])
    assert len(served) == 2
    for statuses_of_one in served.values():
        assert statuses_of_one.count(200) <= 30
        if 429 in statuses_of_one:  # a worker that refused had used its whole share
            assert statuses_of_one.count(200) == 30


def test_quotas_are_shared_again_once_the_board_is_back(start, redis_server):  # noqa: F811
    server = start(SHARED_STATE_URL=redis_server.url, SHARED_STATE_PREFIX="e2e-back:")
    redis_server.kill()
    ids, statuses = fill_minute([server], 8, "blip")
    assert statuses == [200] * 8 and workers_of(server, ids)   # a worker saw it down
    redis_server.start()

    def every_worker_shared():
        answers = [requests.get(server.url + "/v1/usage", headers={"X-API-Key": API},
                                timeout=5) for _ in range(6)]
        return all(a.json()["callers"][0]["shared"] for a in answers)

    assert wait_until(every_worker_shared, timeout=20, interval=0.5)


# --- usage, metrics and cost agree with the upstreams ----------------------------------------

def reported_usage(response):
    """Return the usage an answer reported (a stream: its usage chunk)."""
    if not response.headers["Content-Type"].startswith("text/event-stream"):
        return response.json()["usage"]
    for line in response.text.splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            chunk = yaml.safe_load(line[len("data: "):])
            if chunk.get("usage"):
                return chunk["usage"]
    raise AssertionError("no usage in the stream")


def test_usage_metrics_and_cost_agree_with_the_upstreams(start, fakes):
    server = start()
    fakes["ollama"].behave("status", status=500, path="/api/chat")  # every call falls back
    prompt = completion = 0
    for index in range(6):
        response = chat(server, BATCH, stream=index % 2 == 1,
                        stream_options={"include_usage": True} if index % 2 else None)
        assert response.status_code == 200
        assert response.headers["X-Mana-LLM-Resolved"] == "groq/llama-3.1-8b-instant"
        usage = reported_usage(response)
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    assert prompt > 0 and completion > 0

    def minute():
        doc = requests.get(server.url + "/v1/usage", headers={"X-API-Key": BATCH},
                           timeout=5).json()
        return doc["callers"][0]["minute"]

    # A stream is settled once its response closed: poll, do not sleep.
    assert wait_until(lambda: minute()["tokens"] == prompt + completion, timeout=5), minute()
    assert minute()["requests"] == 6
    assert metric(server, "mana_llm_caller_tokens_total", caller="batch", provider="groq",
                  type="prompt") == prompt
    assert metric(server, "mana_llm_caller_tokens_total", caller="batch", provider="groq",
                  type="completion") == completion
    cost = metric(server, "mana_llm_cost_usd_total", caller="batch", provider="groq")
    assert cost == pytest.approx((2.0 * prompt + 4.0 * completion) / 1e6)
    assert metric(server, "mana_llm_cost_usd_total", caller="batch", provider="ollama") == 0
    assert metric(server, "mana_llm_fallback_total", from_model="ollama/qwen2.5:7b") >= 6


def test_usage_is_own_unless_admin(start):
    server = start()

    def usage(key, **params):
        return requests.get(server.url + "/v1/usage", params=params,
                            headers={"X-API-Key": key}, timeout=5)

    assert [c["caller"] for c in usage(BATCH).json()["callers"]] == ["batch"]
    assert usage(BATCH, caller="api").status_code == 403
    assert sorted(c["caller"] for c in usage(ADMIN).json()["callers"]) == \
        ["admin", "api", "batch"]
    assert [c["caller"] for c in usage(ADMIN, caller="api").json()["callers"]] == ["api"]
    assert usage(ADMIN, caller="nobody").status_code == 404
    assert usage("nope").status_code == 401


# --- reloads --------------------------------------------------------------------------------

def test_key_rotation_by_hup_fails_no_request(start, tmp_path):
    # No limit here: the load below would use up 60 a minute on a fast machine.
    write_keys(tmp_path / "keys.yaml", callers_doc(limits={}))
    server = start()
    results = []
    stop = threading.Event()

    def load(key):
        while not stop.is_set():
            try:
                results.append((key, chat(server, key, model="ollama/qwen2.5:7b").status_code))
            except requests.RequestException as exc:
                results.append((key, repr(exc)))

    threads = [threading.Thread(target=load, args=(BATCH,)) for _ in range(2)]
    threads.append(threading.Thread(target=load, args=(API,)))
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(results) > 10, timeout=10)
        assert chat(server, NEW_API).status_code == 401
        write_keys(server.keys_path, callers_doc((API, NEW_API), limits={}))  # both, to change over
        server.hup()
        assert wait_until(lambda: chat(server, NEW_API).status_code == 200
                          and chat(server, NEW_API).status_code == 200, timeout=15)
        before = len(results)
        assert wait_until(lambda: len(results) > before + 10, timeout=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    failures = [r for r in results if r[1] != 200]
    assert len(results) > 20 and failures == []
    write_keys(server.keys_path, callers_doc((NEW_API,), limits={}))  # the old key retired
    server.hup()
    assert wait_until(lambda: all(chat(server, API).status_code == 401 for _ in range(4)),
                      timeout=15)
    assert chat(server, NEW_API).status_code == 200


def test_a_rejected_key_file_keeps_the_last_good_one(start):
    server = start()
    old_workers = set(server.worker_pids())
    server.keys_path.write_text("callers:\n  - name: api\n    keys: ['plaintext-key']\n")
    server.hup()
    assert wait_until(lambda: "is not 'sha256:'" in server.log(), timeout=10), server.log()
    assert "reload rejected, keeping the last good" in server.log()
    assert wait_until(lambda: not (set(server.worker_pids()) & old_workers)
                      and len(server.worker_pids()) == 2, timeout=15)
    for _ in range(6):  # both new workers, from the master's last good snapshot
        assert chat(server, API, model="ollama/qwen2.5:7b").status_code == 200
        assert chat(server, "plaintext-key").status_code == 401
