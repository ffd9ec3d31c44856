"""Provider translation (SPEC §4), the transport's error mapping (§6) and redaction (§8)."""

import email.utils
import json
import math
import time

import socket

import pytest
from urllib3.exceptions import ConnectTimeoutError

from app import errors
from app.config import build_config
from app.providers import build_providers
from app.providers.base import parse_retry_after
from app.providers.transport import Transport
from app.providers.ollama import StreamTranslator, chat_body, supports_tools, translate_answer
from app.providers.openai_compat import translate_chunk, translate_completion, upstream_body
from app.redact import Redactor

GROQ = "/groq/v1"       # base URL paths on the canned upstream
OLLAMA = "/ollama"
GROQ_KEY = "test-groq-key-0123456789"
COOLDOWN = 15.0
USER = {"role": "user", "content": "hi"}


def request(**fields):
    body = {"model": "mana/fast-text", "messages": [dict(USER)]}
    body.update(fields)
    return body


# -- Ollama: request translation ----------------------------------------------------------

def test_data_image_becomes_base64_images():
    body = request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    message, = chat_body(body, "gemma3:4b", False)["messages"]
    assert message == {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png",
                                 "file:///etc/passwd"])
def test_image_url_that_is_not_data_is_refused_as_capability(url):
    body = request(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(errors.CapabilityError) as caught:
        chat_body(body, "gemma3:4b", False)
    assert (caught.value.status, caught.value.kind) == (400, "capability")


def test_data_url_that_is_not_base64_is_invalid_request():
    body = request(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain,hello"}}]}])
    with pytest.raises(errors.InvalidRequest):
        chat_body(body, "gemma3:4b", False)


def test_json_object_format_becomes_json():
    out = chat_body(request(response_format={"type": "json_object"}), "qwen2.5:7b", False)
    assert out["format"] == "json"


def test_json_schema_format_becomes_the_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = request(response_format={"type": "json_schema",
                                    "json_schema": {"name": "thing", "schema": schema}})
    assert chat_body(body, "qwen2.5:7b", False)["format"] == schema


def test_no_response_format_sets_no_format():
    assert "format" not in chat_body(request(), "qwen2.5:7b", False)


def test_sampling_fields_go_into_options():
    body = request(temperature=0.2, top_p=0.8, max_tokens=50, stop=["\n\n", "END"])
    out = chat_body(body, "qwen2.5:7b", False)
    assert out["options"] == {"temperature": 0.2, "top_p": 0.8, "num_predict": 50,
                              "stop": ["\n\n", "END"]}
    assert "max_tokens" not in out and "temperature" not in out


def test_stop_string_becomes_a_list_in_options():
    assert chat_body(request(stop="END"), "qwen2.5:7b", False)["options"]["stop"] == ["END"]


def test_request_names_model_and_stream():
    out = chat_body(request(), "qwen2.5:7b", True)
    assert (out["model"], out["stream"]) == ("qwen2.5:7b", True)


def test_assistant_tool_call_arguments_become_objects():
    body = request(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assistant = chat_body(body, "qwen2.5:7b", False)["messages"][1]
    assert assistant["tool_calls"] == [{"function": {"name": "get_weather",
                                                     "arguments": {"city": "Paris"}}}]
    assert assistant["content"] == ""


def test_tool_call_arguments_nested_too_deep_to_parse_are_an_invalid_request():
    # The JSON parser raises RecursionError for them, not ValueError: it was our 500.
    body = request(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "[" * 100_000 + "]" * 100_000}}]}])
    with pytest.raises(errors.InvalidRequest) as caught:
        chat_body(body, "qwen2.5:7b", False)
    assert caught.value.param == "messages"


# -- Ollama: answer translation -----------------------------------------------------------

def ollama_answer(content="", **extra):
    answer = {"model": "qwen2.5:7b", "message": {"role": "assistant", "content": content},
              "done": True, "done_reason": "stop"}
    answer.update(extra)
    return answer


@pytest.mark.parametrize("content", ['```json\n{"a": 1}\n```', '```\n{"a": 1}\n```',
                                     '  ```json{"a": 1}```  '])
def test_fences_are_stripped_when_json_was_asked(content):
    out = translate_answer(ollama_answer(content), "ollama/qwen2.5:7b", True)
    assert json.loads(out["choices"][0]["message"]["content"]) == {"a": 1}


def test_fences_are_kept_when_json_was_not_asked():
    text = "Here:\n```python\nprint(1)\n```"
    out = translate_answer(ollama_answer(text), "ollama/qwen2.5:7b", False)
    assert out["choices"][0]["message"]["content"] == text


def test_answer_is_a_chat_completion_for_the_entry():
    out = translate_answer(ollama_answer("hello"), "ollama/qwen2.5:7b", False)
    assert (out["object"], out["model"]) == ("chat.completion", "ollama/qwen2.5:7b")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert out["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_get_ids_and_json_string_arguments():
    answer = ollama_answer(message={"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_time", "arguments": {"tz": "CET"}}}]})
    choice, = translate_answer(answer, "ollama/qwen2.5:7b", False)["choices"]
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                       {"tz": "CET"}]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(c["type"] == "function" and isinstance(c["id"], str) and c["id"]
               for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert choice["finish_reason"] == "tool_calls"


def test_tool_call_id_from_upstream_is_kept():
    answer = ollama_answer(message={"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_abc", "function": {"name": "f", "arguments": {}}}]})
    choice, = translate_answer(answer, "ollama/qwen2.5:7b", False)["choices"]
    assert choice["message"]["tool_calls"][0]["id"] == "call_abc"


@pytest.mark.parametrize("done_reason, finish_reason", [("length", "length"),
                                                        ("stop", "stop")])
def test_done_reason_maps_to_finish_reason(done_reason, finish_reason):
    out = translate_answer(ollama_answer("partial", done_reason=done_reason),
                           "ollama/qwen2.5:7b", False)
    assert out["choices"][0]["finish_reason"] == finish_reason


def test_usage_comes_from_eval_counts():
    out = translate_answer(ollama_answer("hi", prompt_eval_count=12, eval_count=5),
                           "ollama/qwen2.5:7b", False)
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


@pytest.mark.parametrize("answer", [{}, {"message": "hi"}, [], "text"])
def test_answer_without_message_is_malformed(answer):
    with pytest.raises(errors.UpstreamError) as caught:
        translate_answer(answer, "ollama/qwen2.5:7b", False)
    assert caught.value.reason == "malformed-response"


@pytest.mark.parametrize("model, expected", [
    ("qwen2.5:7b", True), ("llama3.1:8b", True), ("llama3.2", True), ("llama3.3:70b", True),
    ("qwen3:8b", True), ("mistral:7b", True), ("mixtral:8x7b", True), ("command-r", True),
    ("firefunction-v2", True), ("Qwen2.5:7B", True),
    ("gemma3:4b", False), ("gemma3:12b", False), ("llama3:8b", False), ("llama2", False),
    ("phi3", False), ("qwen2:7b", False),
])
def test_supports_tools(model, expected):
    assert supports_tools(model) is expected


def ndjson(*events):
    return [json.dumps(e).encode() for e in events]


def translate_stream(lines, label="ollama/qwen2.5:7b"):
    translator = StreamTranslator(label)
    return [chunk for line in lines for chunk in translator.translate(line)], translator


def test_stream_lines_become_openai_chunks():
    chunks, translator = translate_stream(ndjson(
        {"message": {"role": "assistant", "content": "Hel"}, "done": False},
        {"message": {"role": "assistant", "content": "lo"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 4, "eval_count": 2}))
    assert translator.done
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"ollama/qwen2.5:7b"}
    assert len({c["id"] for c in chunks}) == 1
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(ch["delta"].get("content") or "" for ch in choices) == "Hello"
    assert choices[0]["delta"].get("role") == "assistant"
    assert [ch["finish_reason"] for ch in choices if ch["finish_reason"]] == ["stop"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2,
                                   "total_tokens": 6}


def test_stream_done_reason_length_finishes_with_length():
    chunks, _ = translate_stream(ndjson(
        {"message": {"content": "abc"}, "done": False},
        {"message": {"content": ""}, "done": True, "done_reason": "length"}))
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [r for r in reasons if r] == ["length"]


def test_stream_tool_calls_are_passed_on():
    chunks, _ = translate_stream(ndjson(
        {"message": {"content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         "done": False},
        {"message": {"content": ""}, "done": True, "done_reason": "stop"}))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    calls = [call for ch in choices for call in ch["delta"].get("tool_calls") or ()]
    assert len(calls) == 1
    assert calls[0]["index"] == 0 and calls[0]["id"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert [ch["finish_reason"] for ch in choices if ch["finish_reason"]] == ["tool_calls"]


def test_stream_error_line_raises_upstream_error():
    translator = StreamTranslator("ollama/qwen2.5:7b")
    translator.translate(ndjson({"message": {"content": "Hel"}, "done": False})[0])
    with pytest.raises(errors.UpstreamError) as caught:
        translator.translate(ndjson({"error": "model runner has unexpectedly stopped"})[0])
    assert "unexpectedly stopped" in caught.value.message
    assert caught.value.on_failure == "trip"


@pytest.mark.parametrize("line", [b"{not json", b"[1, 2]", b'"text"'])
def test_stream_malformed_line_raises_upstream_error(line):
    with pytest.raises(errors.UpstreamError) as caught:
        StreamTranslator("ollama/qwen2.5:7b").translate(line)
    assert caught.value.reason == "malformed-response"


# -- OpenAI-compatible translation --------------------------------------------------------

def test_upstream_body_keeps_unknown_fields_and_sets_upstream_model():
    body = request(temperature=0.3, x_vendor={"a": [1]}, logit_bias={"1": 2}, user="u")
    out = upstream_body(body, "llama-3.1-8b-instant", False)
    assert out == dict(body, model="llama-3.1-8b-instant")
    assert body["model"] == "mana/fast-text"  # the caller's body is not changed


def test_upstream_body_for_a_stream_asks_for_usage():
    out = upstream_body(request(stream=True), "llama-3.1-8b-instant", True)
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}


def test_upstream_body_not_streamed_drops_stream_fields():
    out = upstream_body(request(stream=False, stream_options={"include_usage": True}),
                        "llama-3.1-8b-instant", False)
    assert "stream" not in out and "stream_options" not in out


def completion(model="llama-3.1-8b-instant"):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}]}


def test_translate_completion_rewrites_model_to_provider_and_model():
    out = translate_completion(completion(), "groq/llama-3.1-8b-instant")
    assert out["model"] == "groq/llama-3.1-8b-instant"
    assert out["choices"] == completion()["choices"]


@pytest.mark.parametrize("answer", [{"choices": []}, {"object": "list"}, [],
                                    {"error": {"message": "overloaded"}}],
                         ids=["empty-choices", "no-choices", "list", "error-body"])
def test_translate_completion_refuses_an_answer_without_choices(answer):
    with pytest.raises(errors.UpstreamError):
        translate_completion(answer, "groq/llama-3.1-8b-instant")


def test_translate_chunk_rewrites_model():
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "llama",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    assert translate_chunk(chunk, "groq/llama")["model"] == "groq/llama"


@pytest.mark.parametrize("event", [{"error": {"message": "upstream overloaded"}},
                                   {"error": "upstream overloaded"}],
                         ids=["object", "string"])
def test_translate_chunk_raises_on_in_stream_error(event):
    with pytest.raises(errors.UpstreamError) as caught:
        translate_chunk(event, "groq/llama")
    assert "upstream overloaded" in caught.value.message
    assert caught.value.on_failure == "trip"


# -- Transport: upstream HTTP answers become our errors -----------------------------------

@pytest.fixture
def upstream(canned):
    return canned


def providers_for(url, **config):
    return build_providers(build_config({
        "GROQ_API_KEY": GROQ_KEY, "GROQ_BASE_URL": url + GROQ, "OLLAMA_URL": url + OLLAMA,
        "RATE_LIMIT_COOLDOWN": COOLDOWN, **config}), Redactor([GROQ_KEY]))


@pytest.fixture
def providers(upstream):
    built = providers_for(upstream.url)
    yield built
    for provider in built.values():
        provider.close()


def groq_answers(upstream, providers, **answer):
    upstream.add("POST", GROQ + "/chat/completions", **answer)
    with pytest.raises(errors.GatewayError) as caught:
        providers["groq"].chat(request(), "llama-3.1-8b-instant")
    return caught.value


def test_successful_call_sends_key_and_translates(upstream, providers):
    upstream.add("POST", GROQ + "/chat/completions", json=completion())
    out = providers["groq"].chat(request(temperature=0.5), "llama-3.1-8b-instant")
    assert out["model"] == "groq/llama-3.1-8b-instant"
    sent = upstream.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {GROQ_KEY}"
    assert json.loads(sent.body)["model"] == "llama-3.1-8b-instant"


def test_ollama_call_goes_to_api_chat_with_options(upstream, providers):
    upstream.add("POST", OLLAMA + "/api/chat",
                 json=ollama_answer("hi", prompt_eval_count=3, eval_count=1))
    out = providers["ollama"].chat(request(max_tokens=9), "qwen2.5:7b")
    assert out["model"] == "ollama/qwen2.5:7b"
    sent = json.loads(upstream.calls[0].request.body)
    assert (sent["model"], sent["stream"]) == ("qwen2.5:7b", False)
    assert sent["options"] == {"num_predict": 9}


def test_refused_connection_is_upstream_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        providers = providers_for(f"http://127.0.0.1:{port}")
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            providers["groq"].chat(request(), "llama-3.1-8b-instant")
    assert (caught.value.reason, caught.value.on_failure) == ("ConnectionError", "trip")


def test_answer_slower_than_the_read_timeout_is_upstream_unavailable(upstream):
    upstream.add("POST", GROQ + "/chat/completions", json=completion(), delay=2)
    providers = providers_for(upstream.url, UPSTREAM_TIMEOUT=0.3)
    with pytest.raises(errors.UpstreamUnavailable) as caught:
        providers["groq"].chat(request(), "llama-3.1-8b-instant")
    assert (caught.value.reason, caught.value.on_failure) == ("ReadTimeout", "trip")


def test_connect_timeout_is_upstream_unavailable():
    # A connect timeout cannot be made on loopback reliably: translate the library's error.
    transport = Transport("groq", "http://127.0.0.1:9", connect_timeout=3, read_timeout=5,
                          pool_size=1)
    error = transport.failure(ConnectTimeoutError(None, "timed out"), None, "send", 5)
    assert isinstance(error, errors.UpstreamUnavailable)
    assert (error.reason, error.on_failure) == ("ConnectTimeout", "trip")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_is_upstream_error(upstream, providers, status):
    error = groq_answers(upstream, providers, status=status, body="oops")
    assert type(error) is errors.UpstreamError
    assert (error.status, error.reason, error.on_failure) == (502, f"HTTP {status}", "trip")


# Nested deeper than the JSON parser recurses: it raises RecursionError, not
# ValueError, which escaped every check as the gateway's own 500 (the walk
# stopped there, and the provider, never blamed, kept answering every caller so).
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("status, reason", [(200, "malformed-response"), (500, "HTTP 500"),
                                            (400, "HTTP 400")])
def test_an_answer_nested_too_deep_to_parse_is_the_upstreams_failure(
        upstream, providers, status, reason):
    error = groq_answers(upstream, providers, status=status, body=DEEP)
    assert isinstance(error, errors.GatewayError) and error.reason == reason
    assert error.status != 500


@pytest.mark.parametrize("status, reason", [(200, "too-large"), (500, "HTTP 500")])
def test_an_answer_of_more_objects_than_we_decode_is_not_decoded(upstream, providers,
                                                                 status, reason):
    # 1.8 MB of "{}," is 600,000 dicts once decoded (31 MiB of it: 1.7 GB for three).
    error = groq_answers(upstream, providers, status=status,
                         body='{"choices": [' + "{}," * 600_000 + "{}]}")
    assert (type(error), error.reason) == (errors.UpstreamError, reason)
    assert len(error.message) <= 600


def test_a_stream_event_nested_too_deep_to_parse_is_malformed(upstream, providers):
    content = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    upstream.add("POST", GROQ + "/chat/completions", content_type="text/event-stream",
                 body=f"data: {json.dumps(content)}\n\ndata: {DEEP}\n\n")
    chunks = providers["groq"].stream_chat(request(stream=True), "llama-3.1-8b-instant")
    assert next(chunks)["choices"][0]["delta"]["content"] == "hi"
    with pytest.raises(errors.UpstreamError) as caught:
        next(chunks)
    assert caught.value.reason == "malformed-response"


def test_an_ollama_stream_line_nested_too_deep_to_parse_is_malformed(upstream, providers):
    upstream.add("POST", OLLAMA + "/api/chat", content_type="application/x-ndjson",
                 body=DEEP + "\n")
    with pytest.raises(errors.UpstreamError) as caught:
        list(providers["ollama"].stream_chat(request(stream=True), "qwen2.5:7b"))
    assert caught.value.reason == "malformed-response"


# NaN and Infinity are not JSON: passed on, they reach callers in bodies that
# strict parsers (JavaScript's JSON.parse) reject.
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_an_answer_with_a_non_json_number_is_malformed(upstream, providers, constant):
    body = ('{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": '
            '{"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], '
            f'"usage": {{"prompt_tokens": {constant}}}}}')
    error = groq_answers(upstream, providers, status=200, body=body)
    assert (type(error), error.reason) == (errors.UpstreamError, "malformed-response")


@pytest.mark.parametrize("constant", ["NaN", "Infinity"])
def test_stream_events_with_a_non_json_number_are_malformed(upstream, providers, constant):
    upstream.add("POST", GROQ + "/chat/completions", content_type="text/event-stream",
                 body='data: {"choices": [{"index": 0, "delta": {"content": "hi"}, '
                      f'"logprobs": {constant}, "finish_reason": null}}]}}\n\n')
    with pytest.raises(errors.UpstreamError) as caught:
        list(providers["groq"].stream_chat(request(stream=True), "llama-3.1-8b-instant"))
    assert caught.value.reason == "malformed-response"
    upstream.add("POST", OLLAMA + "/api/chat", content_type="application/x-ndjson",
                 body='{"message": {"content": "hi"}, "eval_count": %s}\n' % constant)
    with pytest.raises(errors.UpstreamError) as caught:
        list(providers["ollama"].stream_chat(request(stream=True), "qwen2.5:7b"))
    assert caught.value.reason == "malformed-response"


def test_429_with_retry_after_seconds_is_rate_limited(upstream, providers):
    error = groq_answers(upstream, providers, status=429, headers={"Retry-After": "7"},
                         json={"error": {"message": "slow down"}})
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == pytest.approx(7)


def test_429_with_retry_after_date_is_rate_limited(upstream, providers):
    when = email.utils.formatdate(time.time() + 7, usegmt=True)
    error = groq_answers(upstream, providers, status=429, headers={"Retry-After": when})
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == pytest.approx(7, abs=1.5)


def test_429_without_retry_after_uses_default_cooldown(upstream, providers):
    error = groq_answers(upstream, providers, status=429, json={"error": {"message": "x"}})
    assert error.retry_after == pytest.approx(COOLDOWN)


@pytest.mark.parametrize("status", [400, 422])
def test_upstream_400_is_invalid_request_with_upstream_message(upstream, providers, status):
    message = "This model's maximum context length is 8192 tokens (context length exceeded)"
    error = groq_answers(upstream, providers, status=status, json={
        "error": {"message": message, "type": "invalid_request_error", "code": None}})
    assert isinstance(error, errors.UpstreamInvalidRequest)
    assert (error.status, error.kind, error.on_failure) == (400, "invalid_request", "stop")
    assert error.message == message


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_401_is_auth_error(upstream, providers, status):
    error = groq_answers(upstream, providers, status=status,
                         json={"error": {"message": "Invalid API Key"}})
    assert isinstance(error, errors.UpstreamAuthError)
    assert (error.status, error.kind, error.on_failure) == (502, "auth", "stop")


def test_upstream_404_is_model_not_found_on_a_live_provider(upstream, providers):
    error = groq_answers(upstream, providers, status=404,
                         json={"error": {"message": "model not found"}})
    assert isinstance(error, errors.UpstreamModelNotFound)
    assert (error.status, error.on_failure) == (404, "next")


@pytest.mark.parametrize("body", ["<html>Bad Gateway</html>", "", '{"choices": [', "\xff"])
def test_200_with_non_json_body_is_malformed(upstream, providers, body):
    error = groq_answers(upstream, providers, status=200, body=body)
    assert type(error) is errors.UpstreamError
    assert error.reason == "malformed-response"


def test_redirect_is_not_followed(upstream, providers):
    upstream.add("POST", "/steal", json=completion())
    upstream.add("GET", "/steal", json=completion())
    error = groq_answers(upstream, providers, status=302,
                         headers={"Location": upstream.url + "/steal"})
    assert type(error) is errors.UpstreamError
    assert error.on_failure == "trip"
    assert [c.request.path for c in upstream.calls] == [GROQ + "/chat/completions"]


def test_upstream_text_is_redacted_before_it_is_cut_short(upstream, providers):
    # The key straddles the 600th character: cutting first would leak its first half.
    text = "x" * 590 + " " + GROQ_KEY + " tail"
    error = groq_answers(upstream, providers, status=500, json={"error": {"message": text}})
    assert GROQ_KEY[:8] not in error.message
    assert len(error.message) <= 600


def test_key_echoed_in_a_stream_error_is_redacted(upstream, providers):
    event = {"error": {"message": f"bad key {GROQ_KEY}"}}
    upstream.add("POST", GROQ + "/chat/completions", content_type="text/event-stream",
                 body=f"data: {json.dumps(event)}\n\n")
    with pytest.raises(errors.UpstreamError) as caught:
        list(providers["groq"].stream_chat(request(), "m"))
    assert GROQ_KEY not in caught.value.message
    assert "[redacted]" in caught.value.message


@pytest.mark.parametrize("answer", [
    {"choices": "x"}, {"choices": [{"message": None}], "x": 1}, [1, 2],
], ids=["choices-string", "message-null", "list"])
def test_ollama_answer_we_cannot_read_is_malformed_response(upstream, providers, answer):
    upstream.add("POST", OLLAMA + "/api/chat", json={"message": {"content": "hi",
                                                                 "tool_calls": answer}})
    with pytest.raises(errors.UpstreamError) as caught:
        providers["ollama"].chat(request(), "qwen2.5:7b")
    assert (caught.value.reason, caught.value.on_failure) == ("malformed-response", "trip")


@pytest.mark.parametrize("message, field", [
    ({"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]},
     "messages[1].tool_calls[0].function"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 5}}]},
     "messages[1].tool_calls[0].function.name"),
    ({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": ["x"]}}]},
     "messages[1].tool_calls[0].function.arguments"),
], ids=["function-string", "name-number", "arguments-list"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
def test_ollama_untranslatable_request_is_invalid_request_before_any_call(
        upstream, providers, message, field, streamed):
    body = request(messages=[dict(USER), message])
    with pytest.raises(errors.InvalidRequest) as caught:
        if streamed:
            providers["ollama"].stream_chat(body, "qwen2.5:7b")
        else:
            providers["ollama"].chat(body, "qwen2.5:7b")
    assert type(caught.value) is errors.InvalidRequest
    assert field in caught.value.message
    assert upstream.calls == []


def test_empty_tools_are_not_forwarded_to_openai_compatible_upstreams():
    assert "tools" not in upstream_body(request(tools=[]), "m", False)
    assert upstream_body(request(tools=[{"type": "function"}]), "m", False)["tools"] == [
        {"type": "function"}]


def test_empty_tools_are_dropped_over_the_wire(upstream, providers):
    upstream.add("POST", GROQ + "/chat/completions", json=completion())
    providers["groq"].chat(request(tools=[]), "llama-3.1-8b-instant")
    assert "tools" not in json.loads(upstream.calls[0].request.body)


def test_retry_after_beyond_an_hour_is_capped(upstream, providers):
    error = groq_answers(upstream, providers, status=429,
                         headers={"Retry-After": "999999999"})
    assert error.retry_after == 3600
    assert error.headers() == {"Retry-After": "3600"}


NOW = 1_700_000_000


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), ("0", 0.0), (" 12 ", 12.0), ("1.5", 1.5), ("-3", 0.0),
    (None, COOLDOWN), ("", COOLDOWN), ("soon", COOLDOWN), ("Mon, 99 Foo 2024", COOLDOWN),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, COOLDOWN, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e400"])
def test_parse_retry_after_is_finite(value):
    assert math.isfinite(parse_retry_after(value, COOLDOWN, now=NOW))


# -- Redactor -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, secret", [
    ("groq said: key test-groq-key-0123456789 refused", "test-groq-key-0123456789"),
    ("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz.", "sk-proj-AbCdEf0123456789xyz"),
    ("bad key sk-or-v1-0123456789abcdef0123", "sk-or-v1-0123456789abcdef0123"),
    ("groq key gsk_AbCdEfGhIjKlMnOp0123 invalid", "gsk_AbCdEfGhIjKlMnOp0123"),
    ("url ?key=AIzaSyA-1234567890abcdefghijkl failed", "AIzaSyA-1234567890abcdefghijkl"),
    ("Incorrect API key provided: sk-proj-****abcd. You can find", "****abcd"),
    ("Incorrect API key provided: test****5678.", "test****5678"),
    ("key sk-abc...wxyz was refused", "abc...wxyz"),
    ("Authorization: Bearer abcdef0123456789", "abcdef0123456789"),
], ids=["configured", "sk-proj", "sk-or", "gsk", "AIza", "masked-sk", "masked-other",
        "elided", "bearer"])
def test_redactor_removes_keys_and_fragments(text, secret):
    out = Redactor([GROQ_KEY]).redact(text)
    assert secret not in out
    assert "[redacted]" in out


def test_redactor_removes_every_configured_secret_even_unshaped():
    out = Redactor(["hunter2-plain", "other-secret-value"]).redact(
        "a hunter2-plain b other-secret-value c")
    assert out == "a [redacted] b [redacted] c"


@pytest.mark.parametrize("text", [
    "This model's maximum context length is 8192 tokens",
    "groq/llama-3.1-8b-instant failed with HTTP 500: upstream overloaded",
    "rate limit reached for model gpt-4o-mini; retry in 7s",
])
def test_redactor_leaves_ordinary_messages_alone(text):
    assert Redactor([GROQ_KEY]).redact(text) == text


@pytest.mark.parametrize("text", ["Invalid value for task-specific parameter",
                                  "upstream network-connectivity problem"])
def test_redactor_leaves_hyphenated_words_alone(text):
    assert Redactor().redact(text) == text


def _embeddings_by_batch(request):
    """Answer each batch with one vector per input, whose value is the input itself."""
    inputs = json.loads(request.body)["input"]
    if request.path.endswith("/api/embed"):
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"embeddings": [[float(i)] for i in inputs], "prompt_eval_count": len(inputs)})
    return 200, {"Content-Type": "application/json"}, json.dumps(
        {"data": [{"index": n, "embedding": [float(i)]} for n, i in enumerate(inputs)],
         "usage": {"prompt_tokens": len(inputs)}})


@pytest.mark.parametrize("name, path, model", [("groq", GROQ + "/embeddings", "embed-m"),
                                               ("ollama", OLLAMA + "/api/embed", "nomic")])
def test_embeddings_go_upstream_in_batches_small_enough_for_the_answer_limit(
        upstream, providers, name, path, model):
    upstream.add("POST", path, callback=_embeddings_by_batch)
    inputs = [str(i) for i in range(600)]
    vectors, tokens = providers[name].embed(inputs, model, {})
    sizes = [len(json.loads(call.request.body)["input"]) for call in upstream.calls
             if call.request.path == path]
    assert sizes == [256, 256, 88]
    assert vectors == [[float(i)] for i in range(600)]  # in order across batches
    assert tokens == 600
