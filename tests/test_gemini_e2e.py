"""Gemini end to end: the openai SDK through the gateway to a fake Gemini REST API."""

import json

import openai
import pytest
import requests

from tests.conftest import KEYS, PIXEL, WEATHER_TOOL, provider_env

pytestmark = pytest.mark.e2e

MODEL = "google/gemini-2.0-flash-exp"
USER = [{"role": "user", "content": "Say hello"}]


def sent(stack, verb="generateContent"):
    """Return the JSON body of the last Gemini call with ``verb``."""
    calls = [r for r in stack.fakes["google"].requests if f":{verb}" in r["path"]]
    assert calls, f"no {verb} call reached the fake Gemini"
    return calls[-1]


def test_plain_answer(stack):
    raw = stack.client().chat.completions.with_raw_response.create(model=MODEL,
                                                                   messages=USER)
    answer = raw.parse()
    assert answer.choices[0].message.content == stack.fakes["google"].reply_text
    assert answer.model == MODEL and raw.headers["X-Mana-LLM-Resolved"] == MODEL
    assert answer.usage.prompt_tokens > 0
    call = sent(stack)
    assert call["headers"]["x-goog-api-key"] == KEYS["google"]
    assert KEYS["google"] not in call["path"]


def test_stream(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True})
    assert raw.headers["X-Mana-LLM-Resolved"] == MODEL
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stack.fakes["google"].reply_text
    assert "alt=sse" in sent(stack, "streamGenerateContent")["path"]
    assert chunks[-1].usage is not None


def test_vision_reaches_gemini_as_inline_data(stack):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
    stack.client().chat.completions.create(model=MODEL,
                                           messages=[{"role": "user", "content": content}])
    parts = sent(stack)["json"]["contents"][0]["parts"]
    assert {"inlineData": {"mimeType": "image/png", "data": PIXEL}} in parts


def test_tool_call_round_trip(stack):
    client = stack.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages,
                                           tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.id and json.loads(call.function.arguments) == {"city": "Paris"}
    declarations = sent(stack)["json"]["tools"][0]["functionDeclarations"]
    assert declarations[0]["name"] == "get_weather"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    second = client.chat.completions.create(model=MODEL, messages=messages,
                                            tools=[WEATHER_TOOL])
    assert "sunny, 21C" in second.choices[0].message.content
    response_part = sent(stack)["json"]["contents"][-1]["parts"][0]["functionResponse"]
    assert response_part["name"] == "get_weather"


def test_json_schema_request(stack):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"], "additionalProperties": False}
    answer = stack.client().chat.completions.create(
        model=MODEL, messages=USER,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "a", "schema": schema}})
    config = sent(stack)["json"]["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["properties"] == {"answer": {"type": "string"}}
    assert "additionalProperties" not in config["responseSchema"]
    assert json.loads(answer.choices[0].message.content)["answer"]


@pytest.mark.parametrize("mode", ["safety", "prompt_blocked"])
def test_safety_block_is_422_blocked(stack, mode):
    stack.fakes["google"].behave(mode)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        stack.client().chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.status_code == 422
    assert caught.value.body["type"] == "blocked"
    assert "SAFETY" in caught.value.body["message"]


def test_truncation_without_text_is_502_truncated(stack):
    stack.fakes["google"].behave("max_tokens_empty")
    response = requests.post(stack.url + "/v1/chat/completions",
                             json={"model": MODEL, "messages": USER, "max_tokens": 5})
    assert response.status_code == 502
    assert response.json()["detail"]["kind"] == "truncated"


def test_truncation_with_text_is_finish_reason_length(stack):
    stack.fakes["google"].behave("max_tokens_text")
    answer = stack.client().chat.completions.create(model=MODEL, messages=USER)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content


def test_embeddings(stack):
    result = stack.client().embeddings.create(model="google/text-embedding-004",
                                              input=["a", "b"])
    assert len(result.data) == 2 and result.model == "google/text-embedding-004"
    body = sent(stack, "batchEmbedContents")["json"]
    assert [r["content"]["parts"][0]["text"] for r in body["requests"]] == ["a", "b"]


def test_vision_alias_falls_from_dead_ollama_to_google(gateway_factory, upstreams):
    upstreams["ollama"].stop()
    env = provider_env({"ollama": upstreams["ollama"], "google": upstreams["google"]})
    server = gateway_factory(env)
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
    response = requests.post(server.url + "/v1/chat/completions", json={
        "model": "mana/vision", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200
    assert response.headers["X-Mana-LLM-Resolved"] == MODEL
    assert response.json()["choices"][0]["message"]["content"] == \
        upstreams["google"].reply_text


def test_google_key_never_logged_or_returned(gateway_factory, upstreams):
    key = KEYS["google"]
    server = gateway_factory(provider_env(upstreams))
    upstreams["google"].behave("status", status=400, path="generateContent", body={
        "error": {"code": 400, "message": f"API key not valid: {key}",
                  "status": "INVALID_ARGUMENT",
                  "details": [{"reason": "API_KEY_INVALID"}]}})
    response = requests.post(server.url + "/v1/chat/completions",
                             json={"model": MODEL, "messages": USER})
    assert response.status_code == 502 and response.json()["detail"]["kind"] == "auth"
    upstreams["google"].behave("status", status=500, body={
        "error": {"code": 500, "message": f"internal, key={key}", "status": "INTERNAL"}})
    for stream in (False, True):
        requests.post(server.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": USER, "stream": stream})
    texts = [response.text, server.log(), requests.get(server.url + "/metrics").text,
             requests.get(server.url + "/v1/health").text]
    assert "API key not valid" in response.text
    for text in texts:
        assert key not in text
