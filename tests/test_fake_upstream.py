"""The fake upstream itself: each wire format and each failure mode does what tests rely on."""

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.fake_upstream import FakeUpstream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = [{"role": "user", "content": "what is the weather"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
GEMINI = "/v1beta/models/gemini-2.0-flash-exp"
CHAT = {  # family: (path, body of a streamed request)
    "ollama": ("/api/chat", {"model": "qwen2.5:7b", "messages": USER}),
    "openai": ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER,
                                        "stream": True}),
    "gemini": (GEMINI + ":streamGenerateContent?alt=sse",
               {"contents": [{"role": "user", "parts": [{"text": "what is the weather"}]}]}),
}


@pytest.fixture
def fake():
    with FakeUpstream(name="ollama") as server:
        yield server


def post(fake, path, body, **kw):
    kw.setdefault("timeout", 5)
    return requests.post(fake.url + path, json=body, **kw)


def iter_frames(response):
    """Yield the JSON frames of an NDJSON or SSE stream ("[DONE]" kept as a string)."""
    for line in response.iter_lines():
        line = line.decode().strip()
        if line.startswith("data: "):
            line = line[len("data: "):]
            yield line if line == "[DONE]" else json.loads(line)
        elif line:
            yield json.loads(line)


def frames(response):
    return list(iter_frames(response))


def text_of(family, frame):
    if family == "ollama":
        return frame.get("message", {}).get("content", "")
    if family == "openai":
        return "".join(c["delta"].get("content") or "" for c in frame.get("choices", []))
    return "".join(p.get("text", "") for c in frame.get("candidates", [])
                   for p in c.get("content", {}).get("parts", []))


def stream_text(family, response):
    return "".join(text_of(family, f) for f in frames(response) if isinstance(f, dict))


# --- wire formats ----------------------------------------------------------------------------

def test_ollama_lists_its_models(fake):
    names = [m["name"] for m in requests.get(fake.url + "/api/tags").json()["models"]]
    assert names == ["qwen2.5:7b", "gemma3:4b", "llava:7b", "nomic-embed-text"]


def test_ollama_streams_ndjson_by_default(fake):
    response = post(fake, "/api/chat", {"model": "qwen2.5:7b", "messages": USER})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = frames(response)
    assert len(lines) >= 4 and not any(line["done"] for line in lines[:-1])
    assert "".join(line["message"]["content"] for line in lines) == "Hello from ollama"
    assert lines[-1]["done_reason"] == "stop"
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (4, 3)


def test_ollama_plain_answer_truncated_by_num_predict(fake):
    body = {"model": "qwen2.5:7b", "messages": USER, "stream": False,
            "options": {"num_predict": 2}}
    answer = post(fake, "/api/chat", body).json()
    assert answer["message"]["content"] == "Hello from"
    assert answer["done"] and answer["done_reason"] == "length"


def test_ollama_json_answer_comes_in_fences(fake):
    body = {"model": "qwen2.5:7b", "messages": USER, "stream": False, "format": "json"}
    content = post(fake, "/api/chat", body).json()["message"]["content"]
    assert content.startswith("```json\n") and content.endswith("\n```")
    assert json.loads(content[8:-4]) == {"answer": "Hello from ollama"}


def test_ollama_embeddings_are_deterministic_per_text(fake):
    first = post(fake, "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}).json()
    again = post(fake, "/api/embed", {"model": "nomic-embed-text", "input": "b"}).json()
    assert len(first["embeddings"]) == 2 and len(first["embeddings"][0]) == 8
    assert again["embeddings"] == [first["embeddings"][1]]


def test_openai_stream_parses_with_the_official_sdk(fake):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello from ollama"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"


def test_openai_plain_completion_and_base64_embeddings_parse_with_the_sdk(fake):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=1)
    assert answer.choices[0].message.content == "Hello"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == 4
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["x"])
    plain = post(fake, "/v1/embeddings", {"model": "m", "input": "x"}).json()
    assert vectors.data[0].embedding == plain["data"][0]["embedding"]


def test_openai_base64_embedding_is_little_endian_float32(fake):
    body = {"model": "m", "input": "x", "encoding_format": "base64"}
    encoded = post(fake, "/v1/embeddings", body).json()["data"][0]["embedding"]
    plain = post(fake, "/v1/embeddings", {"model": "m", "input": "x"}).json()
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == \
        plain["data"][0]["embedding"]


def test_gemini_streams_sse_without_done(fake):
    path, body = CHAT["gemini"]
    response = post(fake, path, body, stream=True)
    raw = response.raw.read().decode()
    events = [json.loads(e[len("data: "):]) for e in raw.split("\r\n\r\n") if e]
    assert len(events) >= 3 and "[DONE]" not in raw
    assert "".join(text_of("gemini", e) for e in events) == "Hello from ollama"
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 3


def test_gemini_plain_answer_and_batch_embeddings(fake):
    body = {"contents": CHAT["gemini"][1]["contents"],
            "generationConfig": {"responseMimeType": "application/json"}}
    answer = post(fake, GEMINI + ":generateContent", body,
                  headers={"x-goog-api-key": "k"}).json()
    assert json.loads(answer["candidates"][0]["content"]["parts"][0]["text"]) == \
        {"answer": "Hello from ollama"}
    assert fake.requests[-1].headers["X-Goog-Api-Key"] == "k"
    requests_ = [{"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}}
                 for t in ("a", "b")]
    vectors = post(fake, "/v1beta/models/text-embedding-004:batchEmbedContents",
                   {"requests": requests_}).json()["embeddings"]
    assert len(vectors) == 2 and vectors[0]["values"] != vectors[1]["values"]


@pytest.mark.parametrize("family, path, body, expected", [
    ("ollama", "/api/chat", {"model": "llama-missing", "messages": USER},
     {"error": 'model "llama-missing" not found, try pulling it first'}),
    ("openai", "/v1/chat/completions", {"model": "llama-missing", "messages": USER},
     {"error": {"message": "The model `llama-missing` does not exist",
                "type": "invalid_request_error", "code": "model_not_found"}}),
    ("gemini", "/v1beta/models/llama-missing:generateContent", {"contents": []},
     {"error": {"code": 404, "status": "NOT_FOUND",
                "message": "models/llama-missing is not found for API version v1beta"}}),
])
def test_missing_model_gets_the_providers_404(fake, family, path, body, expected):
    fake.missing_models = {"llama-missing"}
    response = post(fake, path, body)
    assert (response.status_code, response.json()) == (404, expected)


# --- tools -----------------------------------------------------------------------------------

def test_tool_call_in_each_family(fake):
    ollama = post(fake, "/api/chat", {"model": "qwen2.5:7b", "messages": USER, "tools": TOOLS,
                                      "stream": False}).json()
    assert ollama["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    openai = post(fake, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER,
                                                 "tools": TOOLS}).json()["choices"][0]
    assert openai["finish_reason"] == "tool_calls"
    call = openai["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and json.loads(call["function"]["arguments"]) == \
        {"city": "Paris"}
    fake.behave("tool_call", name="lookup", arguments={"q": 1})
    gemini = post(fake, GEMINI + ":generateContent", {"contents": []}).json()
    assert gemini["candidates"][0]["content"]["parts"] == \
        [{"functionCall": {"name": "lookup", "args": {"q": 1}}}]


def test_streamed_openai_tool_call_reassembles(fake):
    body = {"model": "gpt-4o-mini", "messages": USER, "tools": TOOLS, "stream": True}
    chunks = [f for f in frames(post(fake, "/v1/chat/completions", body)) if f != "[DONE]"]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_result_is_quoted_in_the_answer(fake):
    messages = USER + [{"role": "assistant", "content": None},
                       {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 18C"}]
    answer = post(fake, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": messages,
                                                 "tools": TOOLS}).json()
    assert answer["choices"][0]["message"]["content"] == "The tool said: Sunny, 18C"


# --- behaviour scripting ---------------------------------------------------------------------

def test_times_queue_in_order_then_fall_back_to_default(fake):
    fake.behave("status", times=1, status=500)
    fake.behave("status", times=2, status=503)
    codes = [requests.get(fake.url + "/api/tags").status_code for _ in range(4)]
    assert codes == [500, 503, 503, 200]


def test_path_restricts_a_behaviour(fake):
    fake.behave("status", status=502, path="chat")
    assert requests.get(fake.url + "/api/tags").status_code == 200
    assert post(fake, "/api/chat", {"model": "m", "messages": USER}).status_code == 502
    assert fake.hits("/api/chat") == 1 and fake.hits() == 2


def test_reset_clears_behaviour_requests_and_settings(fake):
    fake.behave("status", status=500)
    fake.reply_text = "changed"
    requests.get(fake.url + "/api/tags")
    fake.reset()
    assert fake.hits() == 0 and fake.reply_text == "Hello from ollama"
    assert requests.get(fake.url + "/api/tags").status_code == 200


def test_unknown_path_and_head_are_404(fake):
    assert requests.get(fake.url + "/nope").status_code == 404
    assert requests.head(fake.url + "/api/tags").status_code == 404
    assert fake.hits("/api/tags") == 1


# --- failure modes ---------------------------------------------------------------------------

@pytest.mark.parametrize("family, expected", [
    ("ollama", {"error": "fake upstream error 500"}),
    ("openai", {"error": {"message": "fake upstream error 500", "type": "server_error",
                          "code": 500}}),
    ("gemini", {"error": {"code": 500, "message": "fake upstream error 500",
                          "status": "INTERNAL"}}),
])
def test_status_uses_the_family_error_body(fake, family, expected):
    fake.behave("status", status=500)
    path, body = CHAT[family]
    response = post(fake, path, body)
    assert (response.status_code, response.json()) == (500, expected)


def test_status_with_own_body_and_headers(fake):
    fake.behave("status", status=502, body="<html>bad gateway</html>",
                headers={"Content-Type": "text/html", "X-Why": "test"})
    response = requests.get(fake.url + "/v1/models")
    assert response.status_code == 502 and response.text == "<html>bad gateway</html>"
    assert response.headers["Content-Type"] == "text/html" and response.headers["X-Why"] == "test"


def test_rate_limit_sends_retry_after(fake):
    fake.behave("rate_limit", retry_after="7")
    response = post(fake, *CHAT["gemini"])
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_malformed_is_a_200_that_is_not_json(fake):
    fake.behave("malformed")
    response = post(fake, *CHAT["openai"])
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        response.json()


def test_delay_answers_late(fake):
    fake.behave("delay", seconds=0.3)
    started = time.monotonic()
    assert requests.get(fake.url + "/api/tags", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_hang_never_answers_and_stop_releases_it_quickly(fake):
    fake.behave("hang")
    with pytest.raises(requests.ReadTimeout):
        requests.get(fake.url + "/api/tags", timeout=0.3)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(requests.RequestException, requests.get, fake.url + "/api/tags",
                      timeout=100)))
    thread.start()
    assert fake.wait_for(lambda: fake.hits() == 2)
    started = time.monotonic()
    fake.stop()
    thread.join(timeout=60)
    # Released by stop(), not by the client's own 100 s timeout.
    assert time.monotonic() - started < 60 and not thread.is_alive() and errors
    fake.stop()  # idempotent


@pytest.mark.parametrize("family", ["ollama", "openai", "gemini"])
def test_drop_after_cuts_the_stream_after_n_chunks(fake, family):
    fake.behave("drop_after", chunks=2)
    path, body = CHAT[family]
    response = post(fake, path, body, stream=True)
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for frame in iter_frames(response):
            received.append(frame)
    texts = [text_of(family, f) for f in received if isinstance(f, dict)]
    assert [t for t in texts if t] == ["Hello ", "from "]
    assert "[DONE]" not in received


def test_drop_after_cuts_a_plain_body_in_half(fake):
    fake.behave("drop_after")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(fake.url + "/api/tags", timeout=5)


def test_stall_after_goes_silent_with_the_connection_open(fake):
    fake.behave("stall_after", chunks=1)
    response = post(fake, *CHAT["ollama"], stream=True, timeout=(2, 0.5))
    lines = response.iter_lines()
    assert json.loads(next(lines))["message"]["content"] == "Hello "
    with pytest.raises(requests.exceptions.ConnectionError):
        next(lines)


@pytest.mark.parametrize("family, error", [
    ("ollama", {"error": "model runner crashed"}),
    ("openai", {"error": {"message": "overloaded", "type": "server_error", "code": 500}}),
    ("gemini", {"error": {"code": 500, "message": "internal", "status": "INTERNAL"}}),
])
def test_stream_error_sends_an_error_event_before_content(fake, family, error):
    fake.behave("stream_error")
    path, body = CHAT[family]
    received = frames(post(fake, path, body))
    assert received[-1] == error
    assert all(not text_of(family, f) for f in received)


def test_trickle_sends_one_byte_per_interval(fake):
    fake.behave("trickle", interval=0.05)
    response = requests.get(fake.url + "/api/tags", stream=True, timeout=5)
    started = time.monotonic()
    assert response.raw.read(4) == b'{"mo'
    assert time.monotonic() - started >= 0.1
    response.close()


def test_slow_stream_sends_n_chunks(fake):
    fake.behave("slow_stream", interval=0.01, chunks=5)
    lines = frames(post(fake, *CHAT["ollama"]))
    assert [line["message"]["content"] for line in lines[:-1]] == \
        ["Hello ", "from ", "ollama ", "Hello ", "from"]


def test_client_leaving_a_stream_is_counted(fake):
    fake.behave("slow_stream", interval=0.02, chunks=200)
    response = post(fake, *CHAT["openai"], stream=True)
    next(response.iter_lines())
    response.close()
    assert fake.wait_for(lambda: fake.stream_write_failures >= 1, timeout=5)


def test_huge_body_declares_its_size_and_sends_it_block_by_block(fake):
    fake.behave("huge_body", size=300_000)
    response = post(fake, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER})
    assert response.headers["Content-Length"] == "300000"
    assert len(response.content) == 300_000
    assert len(response.json()["choices"][0]["message"]["content"]) > 299_000


def test_huge_body_with_a_filler_is_many_small_values(fake):
    fake.behave("huge_body", size=30_000, filler="{},")
    response = post(fake, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER})
    answer = response.json()
    assert int(response.headers["Content-Length"]) == len(response.content) > 29_900
    assert answer["choices"][0]["message"]["content"] == "x"
    assert answer["extra"][:2] == [{}, {}] and len(answer["extra"]) > 9_900


def test_huge_body_stops_writing_when_the_client_leaves(fake):
    fake.behave("huge_body")  # 400 MB declared
    response = post(fake, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER},
                    stream=True)
    assert len(response.raw.read(1_000_000)) == 1_000_000
    response.close()
    assert fake.wait_for(lambda: fake.stream_write_failures >= 1, timeout=10)


def test_flood_repeats_its_frame_up_to_its_size(fake):
    fake.behave("flood", frame="data: {}\n\n", size=1000)
    response = post(fake, *CHAT["openai"])
    assert response.headers["Content-Type"] == "text/event-stream"
    assert set(response.text.split("\n\n")) == {"data: {}", ""}
    assert 1000 <= len(response.content) < 1000 + 65536


def test_flood_sends_keep_alive_comments_every_interval(fake):
    fake.behave("flood", interval=0.05)
    response = post(fake, *CHAT["ollama"], stream=True)
    started = time.monotonic()
    lines = response.iter_lines()
    assert [next(lines) for _ in range(4)] == [b": keep-alive", b"", b": keep-alive", b""]
    assert time.monotonic() - started >= 0.05
    response.close()
    assert fake.wait_for(lambda: fake.stream_write_failures >= 1, timeout=5)


@pytest.mark.parametrize("mode, finish, text", [
    ("safety", "SAFETY", ""),
    ("max_tokens_empty", "MAX_TOKENS", ""),
    ("max_tokens_text", "MAX_TOKENS", "Hello"),
])
def test_gemini_finish_reasons(fake, mode, finish, text):
    fake.behave(mode)
    answer = post(fake, GEMINI + ":generateContent", {"contents": []}).json()
    assert answer["candidates"][0]["finishReason"] == finish
    assert text_of("gemini", answer) == text


def test_gemini_prompt_blocked_has_no_candidates(fake):
    fake.behave("prompt_blocked")
    answer = post(fake, GEMINI + ":generateContent", {"contents": []}).json()
    assert "candidates" not in answer and answer["promptFeedback"]["blockReason"] == "SAFETY"


# --- command line ----------------------------------------------------------------------------

def test_runs_as_a_module_until_ctrl_c():
    process = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", "0",
                                "--name", "cli"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        answer = requests.post(url + "/api/chat", json={"model": "m", "stream": False},
                               timeout=5).json()
        assert answer["message"]["content"] == "Hello from cli"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0


def test_counts_the_most_requests_answered_at_once(fake):
    fake.behave("delay", path="/api/chat", seconds=0.5)
    body = {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}],
            "stream": False}
    threads = [threading.Thread(target=requests.post, args=(fake.url + "/api/chat",),
                                kwargs={"json": body, "timeout": 10}) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert fake.wait_for(lambda: fake.concurrent("/api/chat") == 3)
    for thread in threads:
        thread.join(timeout=10)
    assert fake.concurrent("/api/chat") == 0
    assert fake.max_concurrent("/api/chat") == 3 and fake.max_concurrent("/api/tags") == 0
