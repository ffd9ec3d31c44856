"""The Gemini adapter: pure translation, and the wire against a local canned server."""

import json

import pytest

from app import errors
from app.config import build_config
from app.providers import build_providers, gemini
from app.providers.gemini import GeminiProvider

BASE = "/v1beta"  # the base URL's path on the canned upstream
KEY = "test-google-key"
LABEL = "google/gemini-2.0-flash"
PNG = "data:image/png;base64,iVBORw0KGgo="

# Nested deeper than the JSON parser recurses (RecursionError, not ValueError):
# a caller's 200 KB request was the gateway's own 500.
DEEP = "[" * 100_000 + "]" * 100_000


def user(text):
    return {"role": "user", "content": text}


def answer_with(parts, finish="STOP", **extra):
    """Return a ``generateContent`` answer with one candidate."""
    return {"candidates": [{"content": {"role": "model", "parts": parts},
                            "finishReason": finish}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3},
            **extra}


@pytest.fixture
def mocked(canned):
    return canned


@pytest.fixture
def provider(mocked):
    providers = build_providers(build_config({"GOOGLE_API_KEY": KEY,
                                              "GOOGLE_BASE_URL": mocked.url + BASE}))
    yield providers["google"]
    for each in providers.values():
        each.close()


# ---- request building --------------------------------------------------------


def test_google_is_registered_and_configured(provider):
    assert isinstance(provider, GeminiProvider)
    assert provider.configured


def test_google_without_key_is_unconfigured():
    providers = build_providers(build_config({}))
    assert not providers["google"].configured


def test_system_messages_become_one_system_instruction():
    body = gemini.chat_body({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Answer in German."}]},
        user("Hi")]})
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nAnswer in German."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]


def test_roles_map_to_user_and_model():
    body = gemini.chat_body({"messages": [
        user("Hi"), {"role": "assistant", "content": "Hello"}, user("Bye")]})
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][1]["parts"] == [{"text": "Hello"}]


def test_consecutive_same_role_messages_are_merged():
    body = gemini.chat_body({"messages": [user("one"), user("two"),
                                          {"role": "assistant", "content": "three"}]})
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}]}]


def test_data_url_image_becomes_inline_data():
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": PNG}}]
    body = gemini.chat_body({"messages": [{"role": "user", "content": content}]})
    assert body["contents"][0]["parts"] == [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]


@pytest.mark.parametrize("url, error", [
    ("https://example.com/cat.png", errors.CapabilityError),
    ("http://169.254.169.254/latest", errors.CapabilityError),
    ("data:image/png,notbase64", errors.InvalidRequest),
    ("data:;base64,AAAA", errors.InvalidRequest),
])
def test_unusable_image_urls_are_refused(url, error):
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(error):
        gemini.chat_body({"messages": [{"role": "user", "content": content}]})


def test_sampling_options_go_into_generation_config():
    body = gemini.chat_body({"messages": [user("Hi")], "temperature": 0.2, "top_p": 0.9,
                             "max_tokens": 50, "stop": "END", "seed": 4,
                             "frequency_penalty": 0.5})
    assert body["generationConfig"] == {"temperature": 0.2, "topP": 0.9,
                                        "maxOutputTokens": 50, "stopSequences": ["END"],
                                        "seed": 4}


def test_stop_list_is_passed_as_list():
    body = gemini.chat_body({"messages": [user("Hi")], "stop": ["a", "b"]})
    assert body["generationConfig"]["stopSequences"] == ["a", "b"]


def test_no_options_means_no_generation_config():
    assert "generationConfig" not in gemini.chat_body({"messages": [user("Hi")]})


def test_json_object_sets_response_mime_type():
    body = gemini.chat_body({"messages": [user("Hi")],
                             "response_format": {"type": "json_object"}})
    assert body["generationConfig"] == {"responseMimeType": "application/json"}


def test_json_schema_is_cleaned_into_response_schema():
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "additionalProperties": False, "required": ["name"],
              "properties": {
                  "name": {"type": "string", "description": "who"},
                  "tags": {"type": "array",
                           "items": {"type": "object", "additionalProperties": False,
                                     "properties": {"additionalProperties": {
                                         "type": "string"}}}},
                  "nick": {"type": ["string", "null"]},
                  "pick": {"anyOf": [{"type": "integer", "$ref": "#/x"}]}}}
    body = gemini.chat_body({"messages": [user("Hi")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                               "schema": schema}}})
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {
        "type": "object", "required": ["name"],
        "properties": {
            "name": {"type": "string", "description": "who"},
            # A property *named* additionalProperties is data, not a keyword.
            "tags": {"type": "array", "items": {"type": "object", "properties": {
                "additionalProperties": {"type": "string"}}}},
            "nick": {"type": "string", "nullable": True},
            "pick": {"anyOf": [{"type": "integer"}]}}}


def test_cleaning_does_not_mutate_the_callers_schema():
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"a": {"type": "string", "additionalProperties": False}}}
    before = json.loads(json.dumps(schema))
    gemini.clean_schema(schema)
    assert schema == before


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_become_function_declarations():
    body = gemini.chat_body({"messages": [user("Weather?")], "tools": [WEATHER]})
    assert body["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}]}]
    assert "toolConfig" not in body


@pytest.mark.parametrize("parameters", [None, {}, {"type": "object", "properties": {}}])
def test_tool_without_arguments_has_no_parameters(parameters):
    tool = {"type": "function", "function": {"name": "now", "parameters": parameters}}
    body = gemini.chat_body({"messages": [user("Time?")], "tools": [tool]})
    assert body["tools"][0]["functionDeclarations"] == [{"name": "now"}]


@pytest.mark.parametrize("choice, config", [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
])
def test_tool_choice_becomes_function_calling_config(choice, config):
    body = gemini.chat_body({"messages": [user("Weather?")], "tools": [WEATHER],
                             "tool_choice": choice})
    assert body["toolConfig"] == {"functionCallingConfig": config}


@pytest.mark.parametrize("choice", ["sometimes", {"type": "function"}, {"function": {}}])
def test_unknown_tool_choice_is_an_invalid_request(choice):
    with pytest.raises(errors.InvalidRequest):
        gemini.chat_body({"messages": [user("Hi")], "tools": [WEATHER],
                          "tool_choice": choice})


def tool_round_trip(result, **call_extra):
    """Return messages: a question, the assistant's tool call, and the tool's result."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            **call_extra}
    return [user("Weather in Paris?"),
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result}]


def test_tool_round_trip_becomes_function_call_and_response():
    body = gemini.chat_body({"messages": tool_round_trip('{"temp": 21}')})
    model, response = body["contents"][1:]
    assert model["role"] == "model"
    assert model["parts"][0]["functionCall"] == {"name": "get_weather",
                                                 "args": {"city": "Paris"}}
    assert response == {"role": "user", "parts": [{"functionResponse": {
        "name": "get_weather", "response": {"temp": 21}}}]}


@pytest.mark.parametrize("content, expected", [
    ("sunny", {"content": "sunny"}),
    ("[1, 2]", {"content": "[1, 2]"}),
    ("", {"content": ""}),
    (DEEP, {"content": DEEP}),
    ([{"type": "text", "text": '{"ok": true}'}], {"ok": True}),
])
def test_tool_result_that_is_not_an_object_is_wrapped(content, expected):
    body = gemini.chat_body({"messages": tool_round_trip(content)})
    assert body["contents"][2]["parts"][0]["functionResponse"]["response"] == expected


def test_parallel_tool_results_share_one_user_turn():
    calls = [{"id": f"c{i}", "type": "function",
              "function": {"name": name, "arguments": "{}"}}
             for i, name in enumerate(("first", "second"))]
    body = gemini.chat_body({"messages": [
        user("Go"), {"role": "assistant", "content": "Calling.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
        {"role": "tool", "tool_call_id": "c0", "content": "1"}]})
    model, results = body["contents"][1:]
    assert model["parts"][0] == {"text": "Calling."}
    assert [p["functionCall"]["name"] for p in model["parts"][1:]] == ["first", "second"]
    assert [p["functionResponse"]["name"] for p in results["parts"]] == ["second", "first"]


def test_thought_signature_is_replayed_and_missing_one_uses_the_skip_value():
    signed = gemini.chat_body({"messages": tool_round_trip(
        "x", extra_content={"google": {"thought_signature": "c2ln"}})})
    unsigned = gemini.chat_body({"messages": tool_round_trip("x")})
    assert signed["contents"][1]["parts"][0]["thoughtSignature"] == "c2ln"
    assert unsigned["contents"][1]["parts"][0]["thoughtSignature"] == gemini.SKIP_SIGNATURE


def test_tool_message_without_a_matching_call_is_an_invalid_request():
    with pytest.raises(errors.InvalidRequest):
        gemini.chat_body({"messages": [user("Hi"), {"role": "tool", "tool_call_id": "nope",
                                                    "content": "1"}]})


@pytest.mark.parametrize("arguments", ["{not json", "[1]", DEEP])
def test_bad_tool_call_arguments_are_an_invalid_request(arguments):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(errors.InvalidRequest):
        gemini.chat_body({"messages": [user("Hi"), {"role": "assistant", "content": None,
                                                    "tool_calls": [call]}]})


def test_chat_body_does_not_mutate_the_request():
    body = {"messages": tool_round_trip('{"t": 1}'), "tools": [WEATHER],
            "response_format": {"type": "json_schema", "json_schema": {
                "schema": {"type": "object", "additionalProperties": False}}}}
    before = json.loads(json.dumps(body))
    gemini.chat_body(body)
    assert body == before


@pytest.mark.parametrize("model, path", [
    ("gemini-2.0-flash", "/models/gemini-2.0-flash:generateContent"),
    ("models/gemini-pro", "/models/gemini-pro:generateContent"),
    ("../files?x=1#y", "/models/..%2Ffiles%3Fx%3D1%23y:generateContent"),
])
def test_model_path_keeps_the_model_one_segment(model, path):
    assert gemini.model_path(model, "generateContent") == path


# ---- answer translation ------------------------------------------------------


def test_text_answer_becomes_chat_completion():
    answer = answer_with([{"text": "Hello "}, {"text": "there"}])
    out = gemini.translate_answer(answer, LABEL)
    assert out["object"] == "chat.completion"
    assert out["model"] == LABEL
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_thought_parts_are_not_answer_text():
    answer = answer_with([{"text": "pondering", "thought": True}, {"text": "42"}])
    assert gemini.translate_answer(answer, LABEL)["choices"][0]["message"]["content"] == "42"


def test_thinking_tokens_count_as_completion_tokens():
    answer = answer_with([{"text": "42"}])
    answer["usageMetadata"]["thoughtsTokenCount"] = 10
    assert gemini.translate_answer(answer, LABEL)["usage"]["completion_tokens"] == 13


def test_function_calls_become_tool_calls():
    answer = answer_with([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
         "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "now"}}])
    choice = gemini.translate_answer(answer, LABEL)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    first, second = choice["message"]["tool_calls"]
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert first["id"] != second["id"]
    assert first["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert first["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert json.loads(second["function"]["arguments"]) == {}
    assert "extra_content" not in second


def test_answered_tool_call_replays_into_the_next_request():
    answer = answer_with([{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                           "thoughtSignature": "c2ln"}])
    message = gemini.translate_answer(answer, LABEL)["choices"][0]["message"]
    call_id = message["tool_calls"][0]["id"]
    body = gemini.chat_body({"messages": [
        user("Weather?"), message, {"role": "tool", "tool_call_id": call_id,
                                    "content": '{"temp": 3}'}]})
    assert body["contents"][1]["parts"] == [{
        "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
        "thoughtSignature": "c2ln"}]
    assert body["contents"][2]["parts"][0]["functionResponse"]["name"] == "get_weather"


def test_max_tokens_with_text_is_length():
    answer = answer_with([{"text": "Once upon"}], finish="MAX_TOKENS")
    assert gemini.translate_answer(answer, LABEL)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("reason", ["SAFETY", "RECITATION", "PROHIBITED_CONTENT", "SPII",
                                    "BLOCKLIST"])
def test_safety_finish_reasons_are_blocked(reason):
    with pytest.raises(errors.Blocked, match=reason) as caught:
        gemini.translate_answer(answer_with([{"text": "partial"}], finish=reason), LABEL)
    assert caught.value.status == 422
    assert caught.value.on_failure == "stop"


def test_blocked_prompt_is_blocked():
    answer = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
              "usageMetadata": {"promptTokenCount": 12}}
    with pytest.raises(errors.Blocked, match="PROHIBITED_CONTENT"):
        gemini.translate_answer(answer, LABEL)


@pytest.mark.parametrize("parts", [[], [{"text": ""}], [{"text": "hm", "thought": True}]])
def test_max_tokens_without_text_is_truncated(parts):
    with pytest.raises(errors.Truncated) as caught:
        gemini.translate_answer(answer_with(parts, finish="MAX_TOKENS"), LABEL)
    assert caught.value.status == 502


@pytest.mark.parametrize("answer", [
    answer_with([], finish="STOP"),
    answer_with([{"text": ""}], finish="OTHER"),
    answer_with([], finish="MALFORMED_FUNCTION_CALL"),
    {"candidates": [{"finishReason": "STOP"}]},
    {"candidates": []},
    {},
])
def test_empty_answer_is_an_upstream_error(answer):
    with pytest.raises(errors.UpstreamError) as caught:
        gemini.translate_answer(answer, LABEL)
    assert caught.value.reason == "empty-answer"
    assert caught.value.on_failure == "trip"


def test_non_object_answer_is_malformed():
    with pytest.raises(errors.UpstreamError) as caught:
        gemini.translate_answer([], LABEL)
    assert caught.value.reason == "malformed-response"


# ---- stream translation ------------------------------------------------------


def event(parts=None, finish=None, usage=None):
    """Return one ``streamGenerateContent`` SSE event."""
    candidate = {"content": {"role": "model", "parts": parts or []}}
    if finish:
        candidate["finishReason"] = finish
    out = {"candidates": [candidate]}
    if usage:
        out["usageMetadata"] = usage
    return out


def run_stream(events):
    """Return every chunk a translator makes of ``events``, ending included."""
    translator = gemini.StreamTranslator(LABEL)
    chunks = [c for e in events for c in translator.translate(e)]
    return chunks + translator.end()


USAGE = {"promptTokenCount": 4, "candidatesTokenCount": 2}


def test_text_stream_becomes_chunks():
    chunks = run_stream([event([{"text": "Hel"}]),
                         event([{"text": "lo"}], "STOP", USAGE)])
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas == [{"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["model"] for c in chunks} == {LABEL}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_without_usage_has_no_usage_chunk():
    chunks = run_stream([event([{"text": "Hi"}], "STOP")])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_events_without_content_make_no_chunks():
    translator = gemini.StreamTranslator(LABEL)
    assert translator.translate(event([])) == []
    assert translator.translate({"usageMetadata": USAGE}) == []
    assert translator.translate(event([{"text": "Hi"}]))[0]["choices"][0]["delta"] == {
        "role": "assistant", "content": "Hi"}


def test_stream_function_calls_become_indexed_tool_call_deltas():
    chunks = run_stream([
        event([{"functionCall": {"name": "a", "args": {"x": 1}}}]),
        event([{"functionCall": {"name": "b", "args": {}}}], "STOP", USAGE)])
    first, second = (c["choices"][0]["delta"]["tool_calls"] for c in (chunks[0], chunks[1]))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [(c["index"], c["function"]["name"]) for c in first + second] == [(0, "a"), (1, "b")]
    assert first[0]["function"]["arguments"] == '{"x": 1}'
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_max_tokens_with_text_is_length():
    chunks = run_stream([event([{"text": "Once"}]), event([], "MAX_TOKENS")])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("events, error, reason", [
    ([event([{"text": "Hi"}]), event([], "SAFETY")], errors.Blocked, "blocked"),
    ([{"promptFeedback": {"blockReason": "OTHER"}}], errors.Blocked, "blocked"),
    ([event([], "MAX_TOKENS")], errors.Truncated, "truncated"),
    ([event([], "STOP")], errors.UpstreamError, "empty-answer"),
    ([event([{"text": "Hi"}]), {"error": {"code": 500, "message": "boom"}}],
     errors.UpstreamError, "stream-error"),
    ([event([{"text": "Hi"}])], errors.UpstreamError, "closed-early"),
    ([], errors.UpstreamError, "closed-early"),
    (["nonsense"], errors.UpstreamError, "malformed-response"),
])
def test_stream_failures(events, error, reason):
    with pytest.raises(error) as caught:
        run_stream(events)
    assert caught.value.reason == reason


def test_events_after_the_finish_only_update_usage():
    translator = gemini.StreamTranslator(LABEL)
    translator.translate(event([{"text": "Hi"}], "STOP"))
    assert translator.translate(event([{"text": "more"}], "STOP", USAGE)) == []
    assert translator.end()[0]["usage"]["completion_tokens"] == 2


# ---- embeddings and models (pure) --------------------------------------------


def test_embed_body_names_the_model_per_request():
    assert gemini.embed_body(["a", "b"], "text-embedding-004", 256) == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]},
         "outputDimensionality": 256} for t in ("a", "b")]}


@pytest.mark.parametrize("answer", [{}, {"embeddings": [{"values": ["x"]}]},
                                    {"embeddings": [{"values": [1.0]}]}])
def test_malformed_embeddings_are_upstream_errors(answer):
    with pytest.raises(errors.UpstreamError) as caught:
        gemini.translate_embeddings(answer, 2, LABEL)
    assert caught.value.reason == "malformed-response"


# ---- over the wire (a real local server) ---------------------------------------


def assert_key_in_header_only(call):
    assert call.request.headers["x-goog-api-key"] == KEY
    assert KEY not in call.request.url
    assert "key=" not in call.request.url
    assert "Authorization" not in call.request.headers


def test_chat_over_the_wire(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent",
                json=answer_with([{"text": "Hi!"}]))
    out = provider.chat({"messages": [user("Hello")], "temperature": 0.5},
                        "gemini-2.0-flash")
    assert out["choices"][0]["message"]["content"] == "Hi!"
    assert out["model"] == LABEL
    call = mocked.calls[0]
    assert_key_in_header_only(call)
    assert json.loads(call.request.body) == {
        "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
        "generationConfig": {"temperature": 0.5}}


def gemini_error(code, status, message):
    return {"error": {"code": code, "message": message, "status": status}}


@pytest.mark.parametrize("code, status, error, on_failure", [
    (400, "INVALID_ARGUMENT", errors.UpstreamInvalidRequest, "stop"),
    (403, "PERMISSION_DENIED", errors.UpstreamAuthError, "stop"),
    (404, "NOT_FOUND", errors.UpstreamModelNotFound, "next"),
    (429, "RESOURCE_EXHAUSTED", errors.RateLimited, "cooldown"),
    (500, "INTERNAL", errors.UpstreamError, "trip"),
    (503, "UNAVAILABLE", errors.UpstreamError, "trip"),
])
def test_error_bodies_map_to_our_errors(provider, mocked, code, status, error, on_failure):
    message = f"upstream says {status.lower()}"
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", status=code,
                json=gemini_error(code, status, message))
    with pytest.raises(error) as caught:
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert type(caught.value) is error
    assert caught.value.on_failure == on_failure
    assert message in caught.value.message
    assert "{" not in caught.value.message  # the message, not the raw JSON body


def test_invalid_request_keeps_the_upstreams_own_message(provider, mocked):
    text = "The input token count (1200000) exceeds the maximum number of tokens allowed"
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", status=400,
                json=gemini_error(400, "INVALID_ARGUMENT", text))
    with pytest.raises(errors.UpstreamInvalidRequest) as caught:
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert caught.value.message == text
    assert caught.value.status == 400


def test_rate_limit_honours_retry_after(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", status=429,
                headers={"Retry-After": "30"},
                json=gemini_error(429, "RESOURCE_EXHAUSTED", "quota"))
    with pytest.raises(errors.RateLimited) as caught:
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert caught.value.retry_after == 30


def test_invalid_api_key_is_an_auth_error(provider, mocked):
    body = gemini_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid "
                        "API key.")
    body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                 "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", status=400, json=body)
    with pytest.raises(errors.UpstreamAuthError):
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")


@pytest.mark.parametrize("delay, wait, header", [("39s", 39, "39"),
                                                 ("999999999s", 3600, "3600")],
                         ids=["as-asked", "capped-at-an-hour"])
def test_retry_delay_in_body_sets_the_cooldown(provider, mocked, delay, wait, header):
    body = gemini_error(429, "RESOURCE_EXHAUSTED", "quota")
    body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                 "retryDelay": delay}]
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", status=429, json=body)
    with pytest.raises(errors.RateLimited) as caught:
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert caught.value.retry_after == wait
    assert caught.value.headers() == {"Retry-After": header}


def test_blocked_answer_over_the_wire(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent",
                json={"promptFeedback": {"blockReason": "SAFETY"}})
    with pytest.raises(errors.Blocked):
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")


def sse(*events):
    return "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events)


def test_stream_over_the_wire(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:streamGenerateContent",
                body=sse(event([{"text": "Hel"}]), event([{"text": "lo"}], "STOP", USAGE)),
                content_type="text/event-stream")
    chunks = list(provider.stream_chat({"messages": [user("Hi")], "stream": True},
                                       "gemini-2.0-flash"))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 6
    call = mocked.calls[0]
    assert call.request.params == {"alt": "sse"}
    assert_key_in_header_only(call)
    assert "stream" not in json.loads(call.request.body)


def test_stream_error_status_raises_before_any_chunk(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:streamGenerateContent", status=429,
                json=gemini_error(429, "RESOURCE_EXHAUSTED", "quota"))
    with pytest.raises(errors.RateLimited):
        next(provider.stream_chat({"messages": [user("Hi")]}, "gemini-2.0-flash"))


def test_stream_that_closes_early_over_the_wire(provider, mocked):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:streamGenerateContent",
                body=sse(event([{"text": "Hel"}])), content_type="text/event-stream")
    stream = provider.stream_chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert next(stream)["choices"][0]["delta"]["content"] == "Hel"
    with pytest.raises(errors.UpstreamError) as caught:
        list(stream)
    assert caught.value.reason == "closed-early"


def test_embeddings_over_the_wire(provider, mocked):
    mocked.post(f"{BASE}/models/text-embedding-004:batchEmbedContents",
                json={"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]})
    vectors, tokens = provider.embed(["a", "b"], "text-embedding-004", {})
    assert vectors == [[0.1, 0.2], [0.3, 0.4]]
    assert tokens == 0
    call = mocked.calls[0]
    assert_key_in_header_only(call)
    assert json.loads(call.request.body) == gemini.embed_body(["a", "b"],
                                                              "text-embedding-004")


def test_many_embeddings_are_sent_in_batches_of_100(provider, mocked):
    def reply(request):
        count = len(json.loads(request.body)["requests"])
        return 200, {}, json.dumps({"embeddings": [{"values": [1.0]}] * count})

    mocked.post(f"{BASE}/models/text-embedding-004:batchEmbedContents", callback=reply)
    vectors, _ = provider.embed([str(i) for i in range(250)], "text-embedding-004", {})
    assert len(vectors) == 250
    assert [len(json.loads(c.request.body)["requests"]) for c in mocked.calls] == [
        100, 100, 50]


def test_model_list_over_the_wire(provider, mocked):
    mocked.get(f"{BASE}/models", json={
        "models": [{"name": "models/gemini-2.0-flash"}, {"name": "models/text-embedding-004"}],
        "nextPageToken": "page2"})
    mocked.get(f"{BASE}/models", json={"models": [{"name": "models/gemini-2.5-pro"}]})
    assert provider.list_models() == ["gemini-2.0-flash", "text-embedding-004",
                                      "gemini-2.5-pro"]
    assert mocked.calls[1].request.params == {"pageSize": "1000", "pageToken": "page2"}
    assert_key_in_header_only(mocked.calls[0])


def test_malformed_model_list_is_an_upstream_error(provider, mocked):
    mocked.get(f"{BASE}/models", json={"models": [{"id": "x"}]})
    with pytest.raises(errors.UpstreamError):
        provider.list_models()


@pytest.mark.parametrize("status, alive", [(200, True), (400, True), (403, True),
                                           (500, False), (503, False)])
def test_probe_counts_any_answer_below_500_as_alive(provider, mocked, status, alive):
    mocked.get(f"{BASE}/models", status=status, json={})
    if alive:
        provider.probe(3)
    else:
        with pytest.raises(errors.UpstreamError):
            provider.probe(3)
    assert_key_in_header_only(mocked.calls[0])


# ---- requests that cannot be translated: the caller's 400, nothing sent ------------------

@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": "x"}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": ["x"]}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ({"messages": [user("Hi"), {"role": "assistant", "content": "",
                                "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                   {"role": "tool", "tool_call_id": ["c"], "content": "1"}]},
     "messages[2].tool_call_id"),
    ({"messages": [user("Hi"), {"role": "assistant", "content": "",
                                "tool_calls": [{"function": "x"}]}]},
     "messages[1].tool_calls[0].function"),
    ({"messages": [user("Hi"), {"role": "assistant", "content": "", "tool_calls": [
        {"id": ["c"], "function": {"name": "f", "arguments": 5}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
], ids=["json-schema-string", "schema-list", "parameters-string", "tool-call-id-list",
        "function-string", "arguments-number"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
def test_untranslatable_request_is_invalid_request_before_any_call(provider, mocked, body,
                                                                   field, streamed):
    request = {"messages": [user("Hi")], **body}
    with pytest.raises(errors.InvalidRequest) as caught:
        if streamed:
            provider.stream_chat(request, "gemini-2.0-flash")
        else:
            provider.chat(request, "gemini-2.0-flash")
    assert type(caught.value) is errors.InvalidRequest
    assert field in caught.value.message
    assert mocked.calls == []


@pytest.mark.parametrize("answer", [
    {"promptFeedback": "x", "candidates": []},
    {"candidates": [{"content": "x", "finishReason": "STOP"}]},
    {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
     "usageMetadata": "x"},
], ids=["prompt-feedback-string", "content-string", "usage-string"])
def test_answer_we_cannot_read_is_malformed_response(provider, mocked, answer):
    mocked.post(f"{BASE}/models/gemini-2.0-flash:generateContent", json=answer)
    with pytest.raises(errors.UpstreamError) as caught:
        provider.chat({"messages": [user("Hi")]}, "gemini-2.0-flash")
    assert (caught.value.reason, caught.value.on_failure) == ("malformed-response", "trip")
