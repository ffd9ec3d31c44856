"""End to end: the official openai SDK against the real gateway under gunicorn."""

import json

import openai
import pytest
import requests

from tests.conftest import PIXEL, WEATHER_TOOL

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Say hello"}]


def last_json(fake, path):
    """Return the JSON body of the last request the fake saw on ``path``."""
    matching = [r for r in fake.requests if path in r["path"]]
    assert matching, f"{fake.name} saw no request on {path}"
    return matching[-1]["json"]


def test_plain_completion_from_ollama(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model="qwen2.5:7b", messages=USER)
    answer = raw.parse()
    assert answer.choices[0].message.content == stack.fakes["ollama"].reply_text
    assert answer.model == "ollama/qwen2.5:7b"
    assert raw.headers["X-Mana-LLM-Resolved"] == "ollama/qwen2.5:7b"
    assert answer.usage.completion_tokens == len(stack.fakes["ollama"].reply_text.split())
    assert "gateway;dur=" in raw.headers["Server-Timing"]


@pytest.mark.parametrize("model", ["qwen2.5:7b", "groq/llama-3.1-8b-instant"])
def test_stream_reassembles_to_what_upstream_sent(stack, model):
    provider = "ollama" if "/" not in model else model.split("/")[0]
    resolved = model if "/" in model else f"ollama/{model}"
    raw = stack.client().chat.completions.with_raw_response.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True})
    assert raw.headers["X-Mana-LLM-Resolved"] == resolved
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stack.fakes[provider].reply_text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    assert {c.model for c in chunks} == {resolved}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stream_without_include_usage_has_no_usage_chunk(stack):
    chunks = list(stack.client().chat.completions.create(
        model="groq/llama-3.1-8b-instant", messages=USER, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_openai_compatible_plain_keeps_provider_prefix_in_model(stack):
    answer = stack.client().chat.completions.create(
        model="openrouter/anthropic/claude-3-haiku", messages=USER, temperature=0.2,
        extra_body={"transforms": ["middle-out"]})
    assert answer.model == "openrouter/anthropic/claude-3-haiku"
    sent = last_json(stack.fakes["openrouter"], "chat/completions")
    assert sent["model"] == "anthropic/claude-3-haiku"
    assert sent["transforms"] == ["middle-out"]  # unknown fields pass through
    auth = stack.fakes["openrouter"].requests[-1]["headers"].get("Authorization")
    assert auth == "Bearer sk-or-test-0123456789abcdef"


def test_embeddings_batch_in_one_call_with_base64_default(stack):
    fake = stack.fakes["ollama"]
    inputs = ["first text", "second text", "third"]
    result = stack.client().embeddings.create(model="nomic-embed-text", input=inputs)
    assert [d.index for d in result.data] == [0, 1, 2]
    assert result.model == "ollama/nomic-embed-text"
    calls = [r for r in fake.requests if "/api/embed" in r["path"]]
    assert len(calls) == 1 and calls[0]["json"]["input"] == inputs
    expected = requests.post(fake.url + "/api/embed",
                             json={"model": "nomic-embed-text", "input": inputs}).json()
    for got, want in zip(result.data, expected["embeddings"]):
        assert got.embedding == pytest.approx(want, rel=1e-6)
    assert result.usage.prompt_tokens == expected["prompt_eval_count"]


def test_embeddings_float_format(stack):
    answer = requests.post(stack.url + "/v1/embeddings", json={
        "model": "groq/text-embedding-3-small", "input": "one", "encoding_format": "float"})
    assert answer.status_code == 200
    assert answer.headers["X-Mana-LLM-Resolved"] == "groq/text-embedding-3-small"
    assert isinstance(answer.json()["data"][0]["embedding"][0], float)


def test_models_lists_providers_and_aliases(stack):
    client = stack.client()
    ids = {m.id for m in client.models.list()}
    assert {"ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant",
            "google/gemini-2.0-flash-exp", "mana/fast-text", "mana/vision"} <= ids
    assert client.models.retrieve("mana/long-form").id == "mana/long-form"
    assert client.models.retrieve("ollama/gemma3:4b").id == "ollama/gemma3:4b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ollama/not-there:1b")


def test_models_skips_a_provider_that_fails_to_list(stack):
    stack.fakes["groq"].behave("status", status=500, path="models")
    ids = {m.id for m in stack.client().models.list()}
    assert "ollama/qwen2.5:7b" in ids
    assert not any(i.startswith("groq/") for i in ids)


def test_upstream_400_reaches_sdk_as_bad_request_with_its_message(stack):
    message = "This model's maximum context length is 8192 tokens"
    stack.fakes["groq"].behave("status", status=400, path="chat", body={
        "error": {"message": message, "type": "invalid_request_error", "code": None}})
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model="groq/llama-3.1-8b-instant",
                                               messages=USER)
    assert message in str(caught.value)
    assert caught.value.body["type"] == "invalid_request"


def test_vision_data_url_reaches_ollama_as_images(stack):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
    stack.client().chat.completions.create(
        model="gemma3:4b", messages=[{"role": "user", "content": content}])
    sent = last_json(stack.fakes["ollama"], "/api/chat")
    assert sent["messages"][0]["images"] == [PIXEL]
    assert sent["messages"][0]["content"] == "What is this?"


def test_http_image_url_is_refused_for_ollama_without_fetching(stack):
    content = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]
    with pytest.raises(openai.BadRequestError):
        stack.client().chat.completions.create(
            model="gemma3:4b", messages=[{"role": "user", "content": content}])
    assert stack.fakes["ollama"].hits("/api/chat") == 0


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, "json"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}}}},
     {"type": "object", "properties": {"answer": {"type": "string"}}}),
])
def test_response_format_reaches_ollama_as_format(stack, response_format, expected):
    answer = stack.client().chat.completions.create(
        model="qwen2.5:7b", messages=USER, response_format=response_format)
    assert last_json(stack.fakes["ollama"], "/api/chat")["format"] == expected
    # The fake wraps JSON in ```json fences, as local models do; they are stripped.
    assert json.loads(answer.choices[0].message.content)["answer"]


def tool_round_trip(client, model):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages,
                                           tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    second = client.chat.completions.create(model=model, messages=messages,
                                            tools=[WEATHER_TOOL])
    assert "sunny, 21C" in second.choices[0].message.content


def test_tool_call_round_trip_through_ollama(stack):
    tool_round_trip(stack.client(), "qwen2.5:7b")
    sent = last_json(stack.fakes["ollama"], "/api/chat")
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_tool_call_round_trip_through_openai_compatible(stack):
    tool_round_trip(stack.client(), "groq/llama-3.3-70b-versatile")


def test_streamed_tool_call_through_ollama(stack):
    chunks = list(stack.client().chat.completions.create(
        model="qwen2.5:7b", messages=USER, tools=[WEATHER_TOOL], stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert calls and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_refused_for_non_tool_ollama_model(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model="gemma3:4b", messages=USER,
                                               tools=[WEATHER_TOOL])
    assert caught.value.body["type"] == "capability"
    assert stack.fakes["ollama"].hits("/api/chat") == 0


@pytest.mark.parametrize("model", ["Ollama/qwen2.5:7b", "GROQ/llama-3.1-8b-instant"])
def test_provider_prefix_is_case_insensitive(stack, model):
    raw = stack.client().chat.completions.with_raw_response.create(model=model, messages=USER)
    assert raw.headers["X-Mana-LLM-Resolved"] == model.split("/")[0].lower() + "/" + \
        model.split("/", 1)[1]


def test_vision_alias_skips_an_entry_that_takes_no_image_urls(stack):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    raw = stack.client().chat.completions.with_raw_response.create(
        model="mana/vision", messages=[{"role": "user", "content": content}])
    assert raw.headers["X-Mana-LLM-Resolved"] == "openrouter/openai/gpt-4o-mini"
    assert stack.fakes["ollama"].hits("/api/chat") == 0
    sent = last_json(stack.fakes["openrouter"], "/chat/completions")
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == \
        "https://example.com/cat.png"
