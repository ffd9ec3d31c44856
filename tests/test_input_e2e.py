"""Bad input, auth and secrets, end to end under gunicorn: always a 4xx in our envelope."""

import http.client
import json
import socket
import threading

import pytest
import requests

from tests.conftest import KEYS, provider_env, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_envelope(response, status, kind=None):
    """Assert the SPEC §8 error shape: both envelopes, JSON, the expected status."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"]["message"] and body["error"]["type"] == body["error"]["code"]
    assert body["detail"]["kind"] == body["error"]["type"]
    if kind:
        assert body["detail"]["kind"] == kind


@pytest.mark.parametrize("data, headers", [
    (b'{"messages": [', {"Content-Type": "application/json"}),
    (b'[1, 2]', {"Content-Type": "application/json"}),
    (b'{"messages": "hi"}', {"Content-Type": "application/json"}),
    (b'{"messages": []}', {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": 5}]}', {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}',
     {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}',
     {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
     {"Content-Type": "application/json"}),
    (b'[' * 5000 + b']' * 5000, {"Content-Type": "application/json"}),
    (b'{"messages": [{"role": "user", "content": "x"}]}', {"Content-Type": "text/plain"}),
])
def test_bad_chat_input_is_400_in_envelope(stack, data, headers):
    response = requests.post(stack.url + CHAT, data=data, headers=headers, timeout=10)
    assert 400 <= response.status_code < 500
    assert_envelope(response, response.status_code)
    assert stack.fakes["ollama"].hits("/api/chat") == 0


def test_30_mib_body_is_413(stack):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (30 * 1024 * 1024) + b'"}]}'
    try:
        response = requests.post(stack.url + CHAT, data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
    except requests.ConnectionError:
        pytest.fail("gateway reset the connection instead of answering 413")
    assert_envelope(response, 413, "payload_too_large")


@pytest.mark.parametrize("model", ["qwen\r\nX-Injected: yes", "a\nb", "nul\x00", "m" * 300])
def test_bad_model_string_is_400_and_never_echoed_raw(stack, model):
    response = requests.post(stack.url + CHAT, json={"model": model, "messages": USER},
                             timeout=10)
    assert_envelope(response, 400, "invalid_request")
    assert "X-Injected" not in response.headers
    lines = stack.server.log().splitlines()
    assert not any(line.startswith(("X-Injected", "b", "nul")) for line in lines)


def test_unknown_provider_and_alias_are_404_naming_the_known_ones(stack):
    response = requests.post(stack.url + CHAT, json={"model": "acme/x", "messages": USER})
    assert_envelope(response, 404, "model_not_found")
    assert "groq" in response.json()["error"]["message"]
    response = requests.post(stack.url + CHAT, json={"model": "mana/nope", "messages": USER})
    assert_envelope(response, 404, "model_not_found")
    assert "mana/fast-text" in response.json()["error"]["message"]


def test_unknown_route_and_method_are_json(stack):
    assert_envelope(requests.get(stack.url + "/v1/nothing"), 404)
    assert_envelope(requests.get(stack.url + CHAT), 405)


def test_raw_http_with_broken_request_line_does_not_kill_the_gateway(stack):
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 5\r\n\r\n{bad}")
        assert sock.recv(4096).startswith(b"HTTP/1.1 4")
    assert requests.get(stack.url + "/health").status_code == 200


@pytest.fixture
def secured(gateway_factory, upstreams):
    env = provider_env(upstreams)
    env["GPU_API_KEY"] = "gateway-secret-key-42"
    return gateway_factory(env)


@pytest.mark.parametrize("headers, params", [
    ({}, {}),
    ({"X-API-Key": "wrong"}, {}),
    ({"Authorization": "Bearer wrong"}, {}),
    ({}, {"api_key": "wrong"}),
    ({"X-API-Key": "gateway-secret-key-4"}, {}),
])
def test_missing_or_wrong_key_is_401(secured, headers, params):
    response = requests.get(secured.url + "/v1/aliases", headers=headers, params=params)
    assert_envelope(response, 401, "unauthorized")


def test_non_ascii_key_is_401_not_500(secured):
    response = requests.get(secured.url + "/v1/aliases",
                            headers={"X-API-Key": "cl\u00e9".encode("utf-8")})
    assert_envelope(response, 401, "unauthorized")


@pytest.mark.parametrize("headers, params", [
    ({"X-API-Key": "gateway-secret-key-42"}, {}),
    ({"Authorization": "Bearer gateway-secret-key-42"}, {}),
    ({}, {"api_key": "gateway-secret-key-42"}),
])
def test_right_key_in_any_place_is_served(secured, headers, params):
    response = requests.get(secured.url + "/v1/aliases", headers=headers, params=params)
    assert response.status_code == 200
    assert response.json()["default"] == "mana/fast-text"


def test_sdk_sends_the_key_as_bearer(secured):
    import openai

    client = openai.OpenAI(base_url=secured.url + "/v1", api_key="gateway-secret-key-42",
                           max_retries=0)
    answer = client.chat.completions.create(model="qwen2.5:7b", messages=USER)
    assert answer.model == "ollama/qwen2.5:7b"


def test_health_and_metrics_stay_open(secured):
    assert requests.get(secured.url + "/health").status_code == 200
    assert requests.get(secured.url + "/metrics").status_code == 200


def test_cors_preflight_for_configured_origin(gateway_factory, upstreams):
    env = provider_env(upstreams)
    env["CORS_ORIGINS"] = "https://app.example, https://admin.example"
    server = gateway_factory(env)
    response = requests.options(server.url + CHAT, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-stainless-os,openai-beta,"
                                          "x-bad(name),x-stainless-retry-count"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    allowed = [h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")]
    for name in ("content-type", "x-stainless-os", "openai-beta", "x-stainless-retry-count",
                 "authorization"):
        assert name in allowed
    assert not any("x-bad" in name for name in allowed)
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Origin" in response.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    for method in ("options", "post"):
        other = getattr(requests, method)(server.url + CHAT, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in other.headers
        assert "Origin" in other.headers["Vary"]
        assert "Access-Control-Allow-Credentials" not in other.headers
    served = requests.post(server.url + CHAT, headers={"Origin": "https://admin.example"},
                           json={"model": "qwen2.5:7b", "messages": USER})
    assert served.status_code == 200
    assert served.headers["Access-Control-Allow-Origin"] == "https://admin.example"
    assert "X-Mana-LLM-Resolved" in served.headers["Access-Control-Expose-Headers"]
    assert "Origin" in served.headers["Vary"]


def test_upstream_keys_never_reach_responses_or_logs(gateway, upstreams):
    key = KEYS["groq"]
    masked = key[:8] + "*" * 12 + key[-4:]
    upstreams["groq"].behave("status", status=401, path="chat", body={
        "error": {"message": f"Incorrect API key provided: {masked}. Key was {key}",
                  "type": "invalid_request_error", "code": "invalid_api_key"}})
    upstreams["openrouter"].behave("status", status=500, path="chat", body={
        "error": {"message": f"internal error for key {KEYS['openrouter']}"}})
    texts = []
    for model in ("groq/llama-3.1-8b-instant", "openrouter/anthropic/claude-3-haiku"):
        for stream in (False, True):
            response = requests.post(gateway.url + CHAT, json={
                "model": model, "messages": USER, "stream": stream})
            assert response.status_code in (502, 503)
            texts.append(response.text)
    assert requests.post(gateway.url + CHAT, json={
        "model": "groq/llama-3.1-8b-instant", "messages": USER}).json()["detail"]["kind"] \
        == "auth"
    texts.append(requests.get(gateway.url + "/v1/health").text)
    texts.append(requests.get(gateway.url + "/metrics").text)
    texts.append(gateway.log())
    for text in texts:
        for secret in (key, masked, KEYS["openrouter"], key[-12:]):
            assert secret not in text


# -- what no provider can take is refused at the front door ---------------------------------

CALL_PATHS = ("/api/chat", "/chat/completions", "generateContent", "/api/embed",
              "/embeddings", "embedContent")


def upstream_calls(fakes):
    """Return how many model calls (not probes or listings) the fake upstreams saw."""
    return sum(fake.hits(path) for fake in fakes.values() for path in CALL_PATHS)


def health_untouched(url, provider, samples=6):
    """Tell whether every worker answering still counts ``provider`` healthy, no failures."""
    for _ in range(samples):
        state = requests.get(url + "/v1/health", timeout=5).json()["providers"][provider]
        if state["status"] != "healthy" or state["consecutive_failures"]:
            return False
    return True


TOOL_TURN = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": "schema"}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "s"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters"),
    ({"messages": USER + [TOOL_TURN, {"role": "tool", "tool_call_id": ["call_1"],
                                      "content": "sunny"}]},
     "messages[2].tool_call_id"),
    ({"messages": USER + [TOOL_TURN, {"role": "tool", "tool_call_id": 1, "content": "x"}]},
     "messages[2].tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": "x"}]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": ["call_1"]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": ["c"], "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"city": 1}}}]}]},
     "messages[1].tool_calls[0]"),
    ({"tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
], ids=["json-schema-string", "schema-string", "schema-list", "parameters-string",
        "parameters-list", "tool-call-id-list", "tool-call-id-number", "tool-call-function-string",
        "tool-call-string", "tool-call-id-not-string", "arguments-not-string",
        "tool-choice-function-string"])
@pytest.mark.parametrize("model", ["google/gemini-2.0-flash-exp", "groq/llama-3.1-8b-instant",
                                   "qwen2.5:7b"])
def test_untranslatable_field_is_400_before_any_upstream_call(stack, model, fields, param):
    provider = model.split("/")[0] if "/" in model else "ollama"
    before = len(stack.server.log())
    body = {"model": model, "messages": USER, **fields}
    # More bad requests than FAILURE_THRESHOLD: none of them may count against the provider.
    for stream in (False, True, False):
        response = requests.post(stack.url + CHAT, json=dict(body, stream=stream), timeout=10)
        assert_envelope(response, 400, "invalid_request")
        assert response.json()["error"]["param"] == param
    assert upstream_calls(stack.fakes) == 0
    assert health_untouched(stack.url, provider)
    assert "Traceback" not in stack.server.log()[before:]


def test_more_than_2048_embedding_inputs_is_400_naming_input(stack):
    response = requests.post(stack.url + "/v1/embeddings", timeout=30, json={
        "model": "nomic-embed-text", "input": ["word"] * 2049})
    assert_envelope(response, 400, "invalid_request")
    assert response.json()["error"]["param"] == "input"
    assert upstream_calls(stack.fakes) == 0
    served = requests.post(stack.url + "/v1/embeddings", timeout=30, json={
        "model": "nomic-embed-text", "input": ["word"] * 2048})
    assert served.status_code == 200 and len(served.json()["data"]) == 2048


# -- model strings that a response header could not carry ------------------------------------

@pytest.mark.parametrize("model", ["groq/\u6a21\u578b", "ollama/caf\u00e9", "\u6a21\u578b",
                                   "google/gemini\u2028x", "groq/llama\u0085"])
def test_non_ascii_model_is_400_json_without_upstream_call(stack, model):
    before = len(stack.server.log())
    for stream in (False, True):
        response = requests.post(stack.url + CHAT, timeout=10, json={
            "model": model, "messages": USER, "stream": stream})
        assert_envelope(response, 400, "invalid_request")
        assert response.json()["error"]["param"] == "model"
    embedded = requests.post(stack.url + "/v1/embeddings", json={"model": model, "input": "x"},
                             timeout=10)
    assert_envelope(embedded, 400, "invalid_request")
    looked_up = requests.get(stack.url + "/v1/models/" + model, timeout=10)
    assert_envelope(looked_up, 400, "invalid_request")
    assert upstream_calls(stack.fakes) == 0
    assert "Traceback" not in stack.server.log()[before:]


@pytest.mark.parametrize("origin", ["https://\u00e9vil.example", "null"])
def test_caller_text_in_headers_never_breaks_the_response(stack, origin):
    response = requests.get(stack.url + "/v1/aliases", timeout=10, headers={
        "Origin": origin.encode("utf-8"), "X-Request-ID": "caf\u00e9\r".encode("utf-8")[:-1]})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "caf"


# -- chunked request bodies ------------------------------------------------------------------

def chunked(body, size=1024 * 1024):
    """Return ``body`` in HTTP/1.1 chunked framing."""
    frames = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
              for i in range(0, len(body), size)]
    return b"".join(frames) + b"0\r\n\r\n"


def raw_exchange(port, head, payload):
    """Send a request over a raw socket and return ``(status, headers, body)``.

    The payload goes out from a thread, because the gateway may answer
    before it has read all of it (and then close the connection).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send():
        try:
            sock.sendall(head + payload)
        except OSError:
            pass  # the gateway answered and closed early: the answer is what counts

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.headers, response.read()
    finally:
        sock.close()
        sender.join(timeout=60)


CHUNKED_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")


def chat_body(text):
    return json.dumps({"model": "qwen2.5:7b", "messages": [
        {"role": "user", "content": text}]}).encode()


def assert_raw_envelope(status, headers, body, expected, kind):
    assert status == expected, body[:300]
    assert headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["error"]["type"] == doc["detail"]["kind"] == kind


def test_chunked_body_over_the_limit_is_413_json(stack):
    body = chat_body("a" * int(22.5 * 1024 * 1024))
    status, headers, answer = raw_exchange(stack.server.port, CHUNKED_HEAD, chunked(body))
    assert_raw_envelope(status, headers, answer, 413, "payload_too_large")
    assert upstream_calls(stack.fakes) == 0


@pytest.mark.parametrize("framing", [
    b"zz\r\n{}\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"2\r\n{}XX0\r\n\r\n",
    b"2;bad ext\r\n{}\r\n0\r\n\r\n",
], ids=["size-not-hex", "size-negative", "no-terminator", "bad-extension"])
def test_broken_chunked_encoding_is_400_json(stack, framing):
    before = len(stack.server.log())
    status, headers, answer = raw_exchange(stack.server.port, CHUNKED_HEAD, framing)
    assert_raw_envelope(status, headers, answer, 400, "invalid_request")
    assert upstream_calls(stack.fakes) == 0
    assert "Traceback" not in stack.server.log()[before:]


def test_chunked_body_under_the_limit_is_served_whole(stack):
    text = "b" * (3 * 1024 * 1024) + " end"
    status, _, answer = raw_exchange(stack.server.port, CHUNKED_HEAD,
                                     chunked(chat_body(text), size=100_000))
    assert status == 200, answer[:300]
    sent = [r for r in stack.fakes["ollama"].requests if "/api/chat" in r["path"]]
    assert sent[-1]["json"]["messages"][0]["content"] == text


# -- small compatibility gaps ----------------------------------------------------------------

@pytest.mark.parametrize("model, provider, upstream_model", [
    ("Ollama/gemma3:4b", "ollama", "gemma3:4b"),
    ("GROQ/llama-3.1-8b-instant", "groq", "llama-3.1-8b-instant"),
    ("Google/gemini-2.0-flash-exp", "google", "gemini-2.0-flash-exp"),
    ("OLLAMA/Qwen2.5:7B", "ollama", "Qwen2.5:7B"),
])
def test_provider_prefix_is_case_insensitive(stack, model, provider, upstream_model):
    response = requests.post(stack.url + CHAT, json={"model": model, "messages": USER},
                             timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["X-Mana-LLM-Resolved"] == f"{provider}/{upstream_model}"
    assert upstream_calls({provider: stack.fakes[provider]}) == 1


# -- keys in upstream text and tracebacks ----------------------------------------------------

MODELS = {"groq": "groq/llama-3.1-8b-instant", "google": "google/gemini-2.0-flash-exp",
          "together": "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"}


def key_runs(key, size=8):
    return {key[i:i + size] for i in range(len(key) - size + 1)}


def leaked(text, key):
    """Return the 8-character runs of ``key`` found in ``text``."""
    return sorted(run for run in key_runs(key) if run in text)


@pytest.fixture
def with_together(gateway_factory, upstreams, fake_factory):
    fakes = dict(upstreams, together=fake_factory("together"))
    server = gateway_factory(provider_env(fakes))
    server.fakes = fakes
    return server


@pytest.mark.parametrize("provider", list(MODELS))
def test_key_straddling_the_500_character_cut_never_reaches_the_caller(with_together,
                                                                       provider):
    key = KEYS[provider]
    for cut_inside in (8, 10, 14, 20):
        message = "e" * (500 - cut_inside) + key + " was refused"
        path = "generateContent" if provider == "google" else "/chat/completions"
        with_together.fakes[provider].behave("status", status=400, times=1, path=path, body={
            "error": {"message": message, "code": 400}})
        response = requests.post(with_together.url + CHAT, timeout=10, json={
            "model": MODELS[provider], "messages": USER})
        assert_envelope(response, 400)
        assert leaked(response.text, key) == [], cut_inside
    assert leaked(with_together.log(), key) == []


def test_key_in_a_logged_traceback_is_redacted(with_together):
    key = KEYS["google"]
    # A token count that is the key: the translation raises on it, and the
    # walk logs the exception with its traceback.
    with_together.fakes["google"].behave("status", status=200, path="generateContent", body={
        "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]},
                        "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": key, "candidatesTokenCount": 1}})
    for stream in (False, True):
        response = requests.post(with_together.url + CHAT, timeout=10, json={
            "model": MODELS["google"], "messages": USER, "stream": stream})
        assert leaked(response.text, key) == []
    assert leaked(with_together.log(), key) == []


# -- log forging -----------------------------------------------------------------------------

FORGED = ("2026-01-01 00:00:00,000 INFO [1] [forged-id] app.access: "
          "POST /v1/chat/completions 200 1.0ms model=forged/model")


@pytest.mark.parametrize("separator", ["\r\n", "\n", "\r", "\u2028", "\u0085", "\x1b[2K\r"])
def test_upstream_text_with_line_breaks_is_one_log_line(gateway, upstreams, separator):
    upstreams["groq"].behave("status", status=500, path="chat", body={
        "error": {"message": f"boom{separator}{FORGED}{separator}"}})
    for _ in range(3):  # enough failures to trip: the trip is logged with the reason
        requests.post(gateway.url + CHAT, timeout=10, json={
            "model": "groq/llama-3.1-8b-instant", "messages": USER})
    assert wait_until(lambda: "forged-id" in gateway.log(), timeout=5), gateway.log()
    lines = [line for line in gateway.log().splitlines() if "forged-id" in line]
    # Only the gateway's own records quote it: the walker's failed call and the trip.
    assert lines and all(("app.routing.fallback:" in line and "failed (HTTP 500)" in line)
                         or (" WARNING " in line and "marked unhealthy" in line)
                         for line in lines)
    assert any("marked unhealthy" in line for line in lines)
    assert not any(line.startswith(FORGED[:20]) for line in gateway.log().splitlines())
