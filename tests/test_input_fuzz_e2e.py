"""Random damage to a valid chat request: a 4xx or an answer, never a 5xx or a trip."""

import copy
import json
import random

import pytest
import requests

from tests.test_input_e2e import CHAT, health_untouched

pytestmark = pytest.mark.e2e

# Values of every JSON type, and shapes that look almost right.
ODD_VALUES = [
    None, True, False, 0, -1, 1.5, 10 ** 30, -10 ** 30, 2 ** 63, "", "x", "\u6a21",
    "\x00\r\n", [], [1], ["a"], [{}], {}, {"a": 1}, {"type": "function"}, {"name": 5},
    [[[]]], {"url": 5}, {"type": "text"},
    {"type": "image_url", "image_url": {"url": "data:,"}},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
    {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
]
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
          "n", "stop", "stream", "stream_options", "tools", "tool_choice", "response_format",
          "seed", "user", "logit_bias", "frequency_penalty", "presence_penalty",
          "parallel_tool_calls", "metadata"]
MODELS = ["google/gemini-2.0-flash-exp", "groq/llama-3.1-8b-instant", "qwen2.5:7b"]


def valid_body(model):
    return {"model": model, "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "user", "content": "again"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}}}}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object"}}}}


def containers(doc):
    """Return every dict and list inside ``doc``, ``doc`` included."""
    found, pending = [], [doc]
    while pending:
        item = pending.pop()
        found.append(item)
        pending.extend(v for v in (item.values() if isinstance(item, dict) else item)
                       if isinstance(v, (dict, list)))
    return found


def damaged(model, seed):
    """Return a valid body with one to three fields, anywhere in it, replaced at random."""
    rnd = random.Random(seed)
    body = valid_body(model)
    for _ in range(rnd.randint(1, 3)):
        value = copy.deepcopy(rnd.choice(ODD_VALUES))
        if rnd.random() < 0.3:
            body[rnd.choice(FIELDS)] = value
            continue
        target = rnd.choice([c for c in containers(body) if c])
        if isinstance(target, dict):
            target[rnd.choice(list(target))] = value
        else:
            target[rnd.randrange(len(target))] = value
    body.setdefault("stream", rnd.random() < 0.5)
    return body


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("model", MODELS)
def test_damaged_request_is_a_4xx_or_an_answer_never_a_failure(stack, model, seed):
    body = damaged(model, seed)
    response = requests.post(stack.url + CHAT, data=json.dumps(body), timeout=20,
                             headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (response.text[:300], json.dumps(body)[:600])
    if response.status_code >= 400:
        assert response.json()["error"]["type"] == response.json()["detail"]["kind"]
    provider = model.split("/")[0] if "/" in model else "ollama"
    assert health_untouched(stack.url, provider, samples=2)
    assert "Traceback" not in stack.server.log()
