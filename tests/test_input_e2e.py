"""Bad input, auth and secrets, end to end under gunicorn: always a 4xx in our envelope."""

import socket

import pytest
import requests

from tests.conftest import KEYS, provider_env

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
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = requests.options(server.url + CHAT, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


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
