"""A fake LLM upstream: Ollama, OpenAI-compatible and Gemini wire formats on one port.

Tests start it on 127.0.0.1 (port 0), point the gateway's base URLs at it and tell it
per test how to misbehave::

    with FakeUpstream(name="ollama") as fake:
        fake.behave("status", status=500, path="/api/chat", times=1)
        ...
        assert fake.hits("/api/chat") == 2

Standard library only, so the gateway can be tried with no LLM at all::

    python -m tests.fake_upstream --port 11434 --name ollama
"""

import argparse
import base64
import hashlib
import json
import re
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

__all__ = ["FakeUpstream", "MODES", "RecordedRequest"]

MAX_WAIT = 120.0  # no hang, stall or trickle outlives this, even if stop() is never called
POLL = 0.05
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"
GEMINI_MODES = ("safety", "prompt_blocked", "max_tokens_empty", "max_tokens_text")
MODES = ("ok", "hang", "delay", "status", "rate_limit", "malformed", "drop_after",
         "stall_after", "stream_error", "trickle", "slow_stream", "tool_call",
         "flood", "huge_body") + GEMINI_MODES
# What "huge_body" declares and sends when the test names no size: far more
# than any answer a gateway should hold, written block by block, never built.
HUGE_BODY = 400 * 1000 * 1000
FLOOD_LIMIT = 1 << 30
BLOCK = 65536
DEFAULT_ARGS = {"city": "Paris"}

OLLAMA_MODELS = ("qwen2.5:7b", "gemma3:4b", "llava:7b", "nomic-embed-text")
OPENAI_MODELS = ("llama-3.1-8b-instant", "gpt-4o-mini", "text-embedding-3-small")
GEMINI_MODELS = (
    {"name": "models/gemini-2.0-flash-exp", "displayName": "Gemini 2.0 Flash (fake)",
     "supportedGenerationMethods": ["generateContent", "streamGenerateContent"]},
    {"name": "models/text-embedding-004", "displayName": "Text Embedding 004 (fake)",
     "supportedGenerationMethods": ["embedContent", "batchEmbedContents"]},
)
GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
STREAM_ERRORS = {
    "openai": {"error": {"message": "overloaded", "type": "server_error", "code": 500}},
    "ollama": {"error": "model runner crashed"},
    "gemini": {"error": {"code": 500, "message": "internal", "status": "INTERNAL"}},
}


# --- recorded requests and behaviour rules ---------------------------------------------------

class Headers(dict):
    """Request headers as a dict whose lookups ignore case (keys are stored lower-case)."""

    def __init__(self, items=()):
        super().__init__((key.lower(), value) for key, value in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    """One request as it arrived; also readable as a dict (``r["path"]``)."""

    method: str
    path: str
    headers: Headers
    json: Any
    body: bytes = b""

    @property
    def query(self):
        return dict(parse_qsl(urlsplit(self.path).query))

    def __getitem__(self, key):
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)


@dataclass
class Rule:
    mode: str
    opts: dict
    path: Optional[str] = None
    remaining: Optional[int] = None  # None: until replaced

    def matches(self, path):
        return self.path is None or self.path in path


# --- small pure helpers ----------------------------------------------------------------------

def count_words(*texts):
    return sum(len(text.split()) for text in texts if isinstance(text, str))


def split_pieces(text, minimum=3):
    """Split text into stream pieces (words with trailing space) that join back to it."""
    pieces = re.findall(r"\s*\S+\s*", text)
    if "".join(pieces) != text:
        pieces = [text]
    if len(pieces) >= minimum or len(text) < 2:
        return pieces
    n = min(minimum, len(text))
    return [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]


def embedding_for(text):
    """Return 8 floats derived from the text's hash (exact in float32, so base64 round-trips)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [(byte - 128) / 128 for byte in digest[:8]]


def iso_now():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def short_id():
    return uuid.uuid4().hex[:24]


def as_dict(value):
    return value if isinstance(value, dict) else {}


def as_list(value):
    return value if isinstance(value, list) else []


def bare_model(model):
    return model[len("models/"):] if model.startswith("models/") else model


def message_text(content):
    """Return the text of an OpenAI/Ollama message content (string or list of parts)."""
    if isinstance(content, str):
        return content
    return " ".join(str(part.get("text", "")) for part in as_list(content)
                    if isinstance(part, dict) and part.get("type") == "text")


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def sse(obj, end=b"\n\n"):
    return b"data: " + dumps(obj) + end


def ndjson(obj):
    return dumps(obj) + b"\n"


# --- error bodies ----------------------------------------------------------------------------

def error_body(family, status, message):
    """Return the family's natural error body."""
    if family == "ollama":
        return {"error": message}
    if family == "gemini":
        return {"error": {"code": status, "message": message,
                          "status": GEMINI_STATUS.get(status, "UNKNOWN")}}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def model_not_found(family, model):
    if family == "ollama":
        return {"error": f'model "{model}" not found, try pulling it first'}
    if family == "gemini":
        return {"error": {"code": 404, "status": "NOT_FOUND",
                          "message": f"models/{model} is not found for API version v1beta"}}
    return {"error": {"message": f"The model `{model}` does not exist",
                      "type": "invalid_request_error", "code": "model_not_found"}}


# --- replies ---------------------------------------------------------------------------------

@dataclass
class Reply:
    """What an endpoint answers when it behaves; write modes (drop, trickle…) act on it."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)
    stream: bool = False
    head: list = field(default_factory=list)    # frames that carry no content (role-only)
    chunks: list = field(default_factory=list)  # content frames: what drop/stall_after count
    tail: list = field(default_factory=list)    # finish reason, usage, [DONE]
    error_frames: list = field(default_factory=list)  # what "stream_error" sends instead


def json_reply(obj, status=200, headers=None):
    return Reply(status=status, body=dumps(obj), headers=dict(headers or {}))


@dataclass
class Call:
    """One request to an endpoint, with the behaviour chosen for it."""

    family: str
    kind: str
    body: Any
    query: dict
    path_model: str
    mode: str
    opts: dict
    name: str
    reply_text: str
    missing: frozenset

    def is_missing(self, model):
        return not model or bare_model(model) in self.missing


@dataclass
class ChatAsk:
    """The parts of a chat request the fake's answer depends on, whatever the family."""

    model: str
    stream: bool
    prompt_tokens: int
    wants_json: bool = False
    limit: Optional[int] = None
    tools: list = field(default_factory=list)
    tool_result: Optional[str] = None


@dataclass
class Turn:
    """The assistant's answer before it is put into a wire format."""

    text: str = ""
    pieces: list = field(default_factory=list)
    finish: str = "stop"  # stop | length | tool | safety
    tool_name: Optional[str] = None
    tool_args: Optional[dict] = None
    completion_tokens: int = 0


def plan_turn(call, ask, fence_json=False):
    """Decide what the assistant says for this request and mode."""
    mode = call.mode if call.family == "gemini" or call.mode not in GEMINI_MODES else "ok"
    if mode == "tool_call" or (ask.tools and ask.tool_result is None
                               and mode not in GEMINI_MODES):
        return tool_turn(call, ask)
    if mode in ("safety", "max_tokens_empty"):
        return Turn(finish="safety" if mode == "safety" else "length")
    text = answer_text(call, ask, fence_json)
    limit = ask.limit
    if mode == "max_tokens_text":
        limit = max(1, count_words(text) // 2)
    finish = "stop"
    if isinstance(limit, int) and 0 <= limit < count_words(text):
        text, finish = " ".join(text.split()[:limit]), "length"
    minimum = int(call.opts.get("chunks", 20)) if mode == "slow_stream" else 3
    return Turn(text=text, pieces=split_pieces(text, minimum), finish=finish,
                completion_tokens=count_words(text))


def tool_turn(call, ask):
    name = call.opts.get("name") or (ask.tools[0] if ask.tools else "get_weather")
    args = call.opts.get("arguments") or DEFAULT_ARGS
    if isinstance(args, str):
        args = json.loads(args)
    return Turn(finish="tool", tool_name=name, tool_args=dict(args),
                completion_tokens=max(1, count_words(json.dumps(args))))


def answer_text(call, ask, fence_json):
    if ask.tool_result is not None:
        return f"The tool said: {ask.tool_result}"
    text = call.reply_text
    if call.mode == "slow_stream":
        words = text.split() or ["."]
        count = max(1, int(call.opts.get("chunks", 20)))
        text = " ".join(words[i % len(words)] for i in range(count))
    if ask.wants_json:
        text = json.dumps({"answer": text})
        if fence_json:
            text = f"```json\n{text}\n```"
    return text


# --- Ollama ----------------------------------------------------------------------------------

def ollama_tags(call):
    return json_reply({"models": [
        {"name": name, "model": name, "modified_at": "2024-01-01T00:00:00Z", "size": 1,
         "digest": "x", "details": {}} for name in OLLAMA_MODELS]})


def ollama_root(call):
    return Reply(body=b"Ollama is running", content_type="text/plain; charset=utf-8")


def ollama_version(call):
    return json_reply({"version": "0.0.0-fake"})


def messages_ask(body, **fields):
    """Return a ChatAsk from an OpenAI- or Ollama-shaped body (same messages and tools)."""
    messages = [m for m in as_list(body.get("messages")) if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    tools = [as_dict(t.get("function")).get("name") for t in as_list(body.get("tools"))
             if isinstance(t, dict)]
    return ChatAsk(
        model=str(body.get("model") or ""),
        prompt_tokens=max(1, count_words(*(message_text(m.get("content")) for m in messages))),
        tools=[name for name in tools if name],
        tool_result=message_text(last.get("content")) if last.get("role") == "tool" else None,
        **fields)


def ollama_ask(body):
    return messages_ask(body, stream=body.get("stream", True) is not False,
                        wants_json=bool(body.get("format")),
                        limit=as_dict(body.get("options")).get("num_predict"))


def ollama_chat(call):
    body = as_dict(call.body)
    ask = ollama_ask(body)
    if call.is_missing(ask.model):
        return json_reply(model_not_found("ollama", ask.model), status=404)
    turn = plan_turn(call, ask, fence_json=True)
    line = {"model": ask.model, "created_at": iso_now()}
    final = dict(line, message={"role": "assistant", "content": ""}, done=True,
                 done_reason="length" if turn.finish == "length" else "stop",
                 total_duration=1, load_duration=1, prompt_eval_count=ask.prompt_tokens,
                 eval_count=turn.completion_tokens)
    if not ask.stream:
        return json_reply(dict(final, message=ollama_message(turn)))
    if turn.tool_name:
        chunks = [ndjson(dict(line, message=ollama_message(turn), done=False))]
    else:
        chunks = [ndjson(dict(line, message={"role": "assistant", "content": piece}, done=False))
                  for piece in turn.pieces]
    role_only = dict(line, message={"role": "assistant", "content": ""}, done=False)
    return Reply(stream=True, content_type=NDJSON_TYPE, chunks=chunks, tail=[ndjson(final)],
                 error_frames=[ndjson(role_only), ndjson(STREAM_ERRORS["ollama"])])


def ollama_message(turn):
    if turn.tool_name:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": turn.tool_name, "arguments": turn.tool_args}}]}
    return {"role": "assistant", "content": turn.text}


def ollama_embed(call):
    body = as_dict(call.body)
    model = str(body.get("model") or "")
    if call.is_missing(model):
        return json_reply(model_not_found("ollama", model), status=404)
    if call.kind == "embeddings":  # the legacy single-prompt endpoint
        return json_reply({"embedding": embedding_for(str(body.get("prompt", "")))})
    texts = embed_inputs(body.get("input"))
    return json_reply({"model": model, "embeddings": [embedding_for(t) for t in texts],
                       "total_duration": 1, "prompt_eval_count": max(1, count_words(*texts))})


def embed_inputs(value):
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


# --- OpenAI-compatible -----------------------------------------------------------------------

def openai_models(call):
    return json_reply({"object": "list", "data": [openai_model(call, m) for m in OPENAI_MODELS]})


def openai_model(call, model_id):
    return {"id": model_id, "object": "model", "created": 0, "owned_by": call.name}


def openai_model_one(call):
    if call.path_model not in OPENAI_MODELS or call.is_missing(call.path_model):
        return json_reply(model_not_found("openai", call.path_model), status=404)
    return json_reply(openai_model(call, call.path_model))


def openai_ask(body):
    response_type = as_dict(body.get("response_format")).get("type")
    return messages_ask(body, stream=body.get("stream") is True,
                        wants_json=response_type in ("json_object", "json_schema"),
                        limit=body.get("max_tokens", body.get("max_completion_tokens")))


def openai_chat(call):
    body = as_dict(call.body)
    ask = openai_ask(body)
    if call.is_missing(ask.model):
        return json_reply(model_not_found("openai", ask.model), status=404)
    turn = plan_turn(call, ask)
    base = {"id": "chatcmpl-" + short_id(), "created": int(time.time()), "model": ask.model}
    usage = {"prompt_tokens": ask.prompt_tokens, "completion_tokens": turn.completion_tokens,
             "total_tokens": ask.prompt_tokens + turn.completion_tokens}
    finish = {"tool": "tool_calls", "length": "length"}.get(turn.finish, "stop")
    if not ask.stream:
        choice = {"index": 0, "message": openai_message(turn), "finish_reason": finish,
                  "logprobs": None}
        return json_reply(dict(base, object="chat.completion", choices=[choice], usage=usage))
    include_usage = as_dict(body.get("stream_options")).get("include_usage") is True
    return openai_stream(base, turn, finish, usage if include_usage else None)


def openai_message(turn):
    if turn.tool_name:
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_" + short_id(), "type": "function",
            "function": {"name": turn.tool_name, "arguments": json.dumps(turn.tool_args)}}]}
    return {"role": "assistant", "content": turn.text}


def openai_stream(base, turn, finish, usage):
    def chunk(delta, finish_reason=None):
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse(dict(base, object="chat.completion.chunk", choices=[choice]))

    if turn.tool_name:
        chunks = [chunk({"tool_calls": [delta]}) for delta in openai_tool_deltas(turn)]
    else:
        chunks = [chunk({"content": piece}) for piece in turn.pieces]
    tail = [chunk({}, finish)]
    if usage:
        tail.append(sse(dict(base, object="chat.completion.chunk", choices=[], usage=usage)))
    tail.append(b"data: [DONE]\n\n")
    return Reply(stream=True, content_type=SSE_TYPE,
                 head=[chunk({"role": "assistant", "content": ""})], chunks=chunks, tail=tail,
                 error_frames=[chunk({"role": "assistant"}), sse(STREAM_ERRORS["openai"])])


def openai_tool_deltas(turn):
    """Return the streamed pieces of one tool call: name first, then the arguments in parts."""
    first = {"index": 0, "id": "call_" + short_id(), "type": "function",
             "function": {"name": turn.tool_name, "arguments": ""}}
    parts = split_pieces(json.dumps(turn.tool_args))
    return [first] + [{"index": 0, "function": {"arguments": part}} for part in parts]


def openai_embeddings(call):
    body = as_dict(call.body)
    model = str(body.get("model") or "")
    if call.is_missing(model):
        return json_reply(model_not_found("openai", model), status=404)
    texts = embed_inputs(body.get("input"))
    as_base64 = body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": encode_vector(embedding_for(text), as_base64)}
            for i, text in enumerate(texts)]
    tokens = max(1, count_words(*texts))
    return json_reply({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def encode_vector(vector, as_base64):
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# --- Gemini ----------------------------------------------------------------------------------

def gemini_models(call):
    return json_reply({"models": list(GEMINI_MODELS)})


def gemini_model_one(call):
    for model in GEMINI_MODELS:
        if model["name"] == "models/" + call.path_model and not call.is_missing(call.path_model):
            return json_reply(model)
    return json_reply(model_not_found("gemini", call.path_model), status=404)


def gemini_ask(body, model, stream):
    contents = [c for c in as_list(body.get("contents")) if isinstance(c, dict)]
    texts = [p.get("text") for c in contents + [as_dict(body.get("systemInstruction"))]
             for p in as_list(c.get("parts")) if isinstance(p, dict)]
    config = as_dict(body.get("generationConfig"))
    tools = [as_dict(d).get("name") for t in as_list(body.get("tools"))
             for d in as_list(as_dict(t).get("functionDeclarations"))]
    return ChatAsk(model=model, stream=stream, prompt_tokens=max(1, count_words(*texts)),
                   wants_json=config.get("responseMimeType") == JSON_TYPE,
                   limit=config.get("maxOutputTokens"), tools=[name for name in tools if name],
                   tool_result=gemini_tool_result(contents[-1] if contents else {}))


def gemini_tool_result(content):
    """Return the function response in the last content as text, or None."""
    for part in as_list(content.get("parts")):
        if isinstance(part, dict) and "functionResponse" in part:
            response = as_dict(part["functionResponse"]).get("response")
            values = list(response.values()) if isinstance(response, dict) else []
            if len(values) == 1 and isinstance(values[0], str):
                return values[0]
            return json.dumps(response, ensure_ascii=False)
    return None


def gemini_generate(call):
    stream = call.kind == "streamGenerateContent"
    ask = gemini_ask(as_dict(call.body), call.path_model, stream)
    if call.is_missing(ask.model):
        return json_reply(model_not_found("gemini", ask.model), status=404)
    turn = plan_turn(call, ask)
    usage = {"promptTokenCount": ask.prompt_tokens,
             "candidatesTokenCount": turn.completion_tokens,
             "totalTokenCount": ask.prompt_tokens + turn.completion_tokens}
    if call.mode == "prompt_blocked":
        events = [gemini_blocked(ask, usage)]
    else:
        events = gemini_events(ask.model, turn, usage)
    if not stream:
        return json_reply(gemini_response(ask.model, gemini_parts(turn), turn.finish, usage)
                          if call.mode != "prompt_blocked" else events[0])
    if call.query.get("alt") != "sse":  # without alt=sse Gemini streams one JSON array
        return json_reply(events)
    end = b"\r\n\r\n"
    return Reply(stream=True, content_type=SSE_TYPE, chunks=[sse(e, end) for e in events],
                 error_frames=[sse(STREAM_ERRORS["gemini"], end)])


def gemini_parts(turn):
    if turn.tool_name:
        return [{"functionCall": {"name": turn.tool_name, "args": turn.tool_args}}]
    return [{"text": turn.text}] if turn.text else []


def gemini_events(model, turn, usage):
    """Return the stream's responses: one per text piece, the last with finish and usage."""
    if turn.tool_name or not turn.pieces:
        return [gemini_response(model, gemini_parts(turn), turn.finish, usage)]
    events = [gemini_response(model, [{"text": piece}]) for piece in turn.pieces[:-1]]
    events.append(gemini_response(model, [{"text": turn.pieces[-1]}], turn.finish, usage))
    return events


def gemini_response(model, parts, finish=None, usage=None):
    candidate = {"content": {"role": "model", "parts": parts} if parts else {"role": "model"},
                 "index": 0, "safetyRatings": []}
    if finish == "safety":
        del candidate["content"]
        candidate["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                                       "probability": "HIGH", "blocked": True}]
    if finish:
        candidate["finishReason"] = {"length": "MAX_TOKENS", "safety": "SAFETY"}.get(
            finish, "STOP")
    response = {"candidates": [candidate], "modelVersion": model}
    if usage:
        response["usageMetadata"] = usage
    return response


def gemini_blocked(ask, usage):
    return {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
        "usageMetadata": {"promptTokenCount": usage["promptTokenCount"],
                          "totalTokenCount": usage["promptTokenCount"]},
        "modelVersion": ask.model}


def gemini_embed(call):
    if call.is_missing(call.path_model):
        return json_reply(model_not_found("gemini", call.path_model), status=404)
    body = as_dict(call.body)
    if call.kind == "embedContent":
        return json_reply({"embedding": {"values": embedding_for(gemini_text(body))}})
    return json_reply({"embeddings": [{"values": embedding_for(gemini_text(as_dict(r)))}
                                      for r in as_list(body.get("requests"))]})


def gemini_text(request):
    parts = as_list(as_dict(request.get("content")).get("parts"))
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


# --- routing ---------------------------------------------------------------------------------

ENDPOINTS = {
    ("GET", "ollama", "root"): ollama_root,
    ("GET", "ollama", "tags"): ollama_tags,
    ("GET", "ollama", "version"): ollama_version,
    ("POST", "ollama", "chat"): ollama_chat,
    ("POST", "ollama", "embed"): ollama_embed,
    ("POST", "ollama", "embeddings"): ollama_embed,
    ("GET", "openai", "models"): openai_models,
    ("GET", "openai", "model"): openai_model_one,
    ("POST", "openai", "chat/completions"): openai_chat,
    ("POST", "openai", "embeddings"): openai_embeddings,
    ("GET", "gemini", "models"): gemini_models,
    ("GET", "gemini", "model"): gemini_model_one,
    ("POST", "gemini", "generateContent"): gemini_generate,
    ("POST", "gemini", "streamGenerateContent"): gemini_generate,
    ("POST", "gemini", "batchEmbedContents"): gemini_embed,
    ("POST", "gemini", "embedContent"): gemini_embed,
}


def route(path):
    """Return (family, kind, model named in the path) for a URL path."""
    if path == "/":
        return "ollama", "root", ""
    if path.startswith("/api/"):
        return "ollama", path[len("/api/"):], ""
    if path.startswith("/v1beta/"):
        rest = path[len("/v1beta/"):]
        if rest == "models":
            return "gemini", "models", ""
        if rest.startswith("models/"):
            model, _, method = rest[len("models/"):].rpartition(":")
            return ("gemini", method, model) if model else ("gemini", "model", method)
        return "gemini", rest, ""
    if path.startswith("/v1/"):
        rest = path[len("/v1/"):]
        if rest.startswith("models/"):
            return "openai", "model", rest[len("models/"):]
        return "openai", rest, ""
    return "openai", path, ""


def build_reply(method, call):
    """Return the endpoint's answer for the call (a family 404 for unknown routes)."""
    endpoint = ENDPOINTS.get((method, call.family, call.kind))
    if endpoint is None:
        return json_reply(error_body(call.family, 404, f"fake upstream: no route {method} "
                                                       f"{call.kind!r}"), status=404)
    try:
        return endpoint(call)
    except Exception as exc:  # a bug in the fake, or a body it cannot read: say so loudly
        traceback.print_exc()
        return json_reply(error_body(call.family, 400, f"fake upstream: bad request: {exc!r}"),
                          status=400)


# --- HTTP ------------------------------------------------------------------------------------

class ClientGone(Exception):
    """The client closed the connection while the fake was waiting."""


class Handler(BaseHTTPRequestHandler):
    """Read, record, pick a behaviour, then answer (or misbehave)."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeUpstream/1.0"
    timeout = MAX_WAIT + 30  # idle keep-alive connections do not pin threads forever

    def setup(self):
        super().setup()
        self.fake = self.server.fake
        self.stop_event = self.server.stop_event
        self.started = False  # response headers sent: a write failure now is "mid-stream"
        self.fake._track(self.connection, True)
        self.fake._count("connections_accepted")

    def finish(self):
        self.fake._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def do_HEAD(self):
        self.read_body()
        self.fake._record(self.command, self.path, self.headers, b"")
        self.send_response(404)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def serve(self):
        self.started = False
        path = urlsplit(self.path).path
        try:
            body = self.read_body()
            self.fake._record(self.command, self.path, self.headers, body)
            self.fake._concurrent(path, 1)
            try:
                self.act(self.make_call(body))
            finally:
                self.fake._concurrent(path, -1)
        except (ConnectionError, TimeoutError, ClientGone):
            self.close_connection = True
            if not self.stop_event.is_set():
                self.fake._count("client_disconnects")
                if self.started:  # the client left mid-response (seen on write or while idle)
                    self.fake._count("stream_write_failures")

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def read_chunked(self):
        data = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def make_call(self, body):
        mode, opts = self.fake._next_behaviour(self.path)
        family, kind, model = route(urlsplit(self.path).path)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        return Call(family=family, kind=kind, body=parsed, path_model=model, mode=mode,
                    query=dict(parse_qsl(urlsplit(self.path).query)), opts=opts,
                    name=self.fake.name, reply_text=self.fake.reply_text,
                    missing=frozenset(bare_model(m) for m in self.fake.missing_models))

    def act(self, call):
        mode, opts = call.mode, call.opts
        if mode == "hang":
            self.pause(MAX_WAIT)
            return self.abort()
        if mode == "delay":
            self.pause(float(opts.get("seconds", 1.0)), stop_is_error=True)
        if mode in ("status", "rate_limit", "malformed"):
            return self.send_plain(failure_reply(call))
        if mode == "huge_body":
            return self.send_huge(int(opts.get("size", HUGE_BODY)), opts.get("filler"))
        reply = build_reply(self.command, call)
        if reply.status != 200:
            return self.send_plain(reply)
        if mode == "flood":
            return self.send_flood(reply, opts)
        if reply.stream:
            return self.send_stream(reply, mode, opts)
        if mode == "stream_error":
            message = json.dumps(STREAM_ERRORS[call.family])
            return self.send_plain(json_reply(error_body(call.family, 500, message), 500))
        return self.send_plain(reply, mode, opts)

    # -- waiting -------------------------------------------------------------------------------

    def pause(self, seconds, stop_is_error=False):
        """Wait up to ``seconds``; raise ClientGone if the client leaves, bounded by stop()."""
        deadline = time.monotonic() + min(seconds, MAX_WAIT)
        peer_talks = False
        while not self.stop_event.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if peer_talks:
                self.stop_event.wait(min(left, POLL))
            elif self.readable(min(left, POLL)):
                peer_talks = self.peer_sent_data()
        if stop_is_error:
            raise ClientGone()

    def readable(self, timeout):
        try:
            return bool(select.select([self.connection], [], [], timeout)[0])
        except (OSError, ValueError):
            raise ClientGone()

    def peer_sent_data(self):
        """Return True if the client sent more bytes; raise ClientGone if it closed."""
        try:
            data = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            raise ClientGone()
        return True

    # -- writing -------------------------------------------------------------------------------

    def start_response(self, reply, length=None):
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, str(value))
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.started = True

    def send_plain(self, reply, mode="ok", opts=None):
        opts = opts or {}
        body = reply.body
        self.start_response(reply, len(body))
        if mode == "trickle":
            return self.trickle(body, float(opts.get("interval", 1.0)), self.wfile.write)
        if mode in ("drop_after", "stall_after"):
            self.wfile.write(body[:len(body) // 2])
            if mode == "stall_after":
                self.pause(MAX_WAIT)
            return self.abort()
        self.wfile.write(body)

    def send_stream(self, reply, mode, opts):
        self.start_response(reply)
        count = int(opts.get("chunks", 3))
        if mode == "stream_error":
            return self.write_chunks(reply.error_frames, end=True)
        if mode == "trickle":  # every byte its own chunk, so the client sees each one
            data = b"".join(reply.head + reply.chunks + reply.tail)
            self.trickle(data, float(opts.get("interval", 1.0)), self.write_chunk)
            return self.write_chunks([], end=True)
        if mode in ("drop_after", "stall_after"):
            self.write_chunks(reply.head + reply.chunks[:count])
            if mode == "stall_after":
                self.pause(MAX_WAIT)
            return self.abort()
        interval = float(opts.get("interval", 0.1)) if mode == "slow_stream" else 0.0
        self.write_chunks(reply.head)
        for frame in reply.chunks:
            self.pause(interval, stop_is_error=True)
            self.write_chunk(frame)
        self.write_chunks(reply.tail, end=True)

    def send_huge(self, size, filler=None):
        """Answer 200 with a JSON chat answer of ``size`` bytes, written block by block.

        The bulk is one long content string, or with ``filler`` (``"{},"``,
        say) that repeated in an extra array: many small values.
        """
        head = b'{"choices":[{"index":0,"finish_reason":"stop","message":' \
               b'{"role":"assistant","content":"'
        tail = b'"}}]}'
        if filler:
            head, tail = head + b'x"}}],"extra":[', b"0]}"
        unit = filler.encode() if filler else b"a"
        left = max(0, size - len(head) - len(tail))
        left -= left % len(unit)
        self.start_response(Reply(), len(head) + left + len(tail))
        self.wfile.write(head)
        block = unit * (BLOCK // len(unit))
        while left > 0 and not self.stop_event.is_set():
            self.wfile.write(block[:left])
            left -= len(block)
        self.wfile.write(tail)

    def send_flood(self, reply, opts):
        """Stream ``frame`` (a keep-alive comment unless told) over and over, chunked.

        Until ``size`` bytes, MAX_WAIT, stop() or the client leaves; every
        ``interval`` seconds, or as fast as the client reads when 0.
        """
        frame = opts.get("frame", ": keep-alive\n\n")
        frame = frame.encode("utf-8") if isinstance(frame, str) else bytes(frame)
        interval = float(opts.get("interval", 0.0))
        limit = int(opts.get("size", FLOOD_LIMIT))
        block = frame if interval else frame * max(1, BLOCK // len(frame))
        self.start_response(reply)
        sent, deadline = 0, time.monotonic() + MAX_WAIT
        while sent < limit and time.monotonic() < deadline:
            self.pause(interval, stop_is_error=True)
            self.write_chunk(block)
            sent += len(block)
        self.write_chunks([], end=True)

    def trickle(self, data, interval, write):
        """Write the data one byte per interval with ``write``."""
        for i in range(len(data)):
            self.pause(interval, stop_is_error=True)
            write(data[i:i + 1])

    def write_chunk(self, data):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write_chunks(self, frames, end=False):
        for frame in frames:
            self.write_chunk(frame)
        if end:
            self.wfile.write(b"0\r\n\r\n")

    def abort(self):
        """Cut the connection without finishing the response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def failure_reply(call):
    """Return the reply of the modes that fail before any content: status, 429, not-JSON."""
    opts = call.opts
    if call.mode == "malformed":
        return Reply(body=b'{"choices": [')
    if call.mode == "rate_limit":
        message = "fake upstream error 429: rate limited"
        return json_reply(error_body(call.family, 429, message), status=429,
                          headers={"Retry-After": str(opts.get("retry_after", "2"))})
    status = int(opts.get("status", 500))
    body = opts.get("body")
    headers = dict(opts.get("headers") or {})
    if body is None:
        return json_reply(error_body(call.family, status, f"fake upstream error {status}"),
                          status=status, headers=headers)
    if isinstance(body, (dict, list)):
        return json_reply(body, status=status, headers=headers)
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    return Reply(status=status, body=raw, headers=headers,
                 content_type=content_type or guess_type(raw))


def guess_type(raw):
    try:
        json.loads(raw)
        return JSON_TYPE
    except ValueError:
        return "text/plain; charset=utf-8"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow in sandboxes.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if self.stop_event.is_set() or isinstance(sys.exc_info()[1], (OSError, ClientGone)):
            return
        super().handle_error(request, client_address)


# --- the object tests drive ------------------------------------------------------------------

class FakeUpstream:
    """A fake LLM upstream on 127.0.0.1 that tests can tell to misbehave."""

    def __init__(self, name="fake", port=0):
        self.name = name
        self.port = port
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._connections = set()
        self._clear()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Start serving in a daemon thread; return self."""
        with self._lock:
            if self._server is not None:
                return self
            server = Server(("127.0.0.1", self.port), Handler)
            server.fake = self
            server.stop_event = threading.Event()
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, args=(POLL,),
                                            name=f"fake-upstream-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop listening and release every waiting handler; safe to call twice."""
        with self._lock:
            server, thread, self._server = self._server, self._thread, None
            connections = list(self._connections)
        if server is None:
            return
        server.stop_event.set()
        server.shutdown()
        server.server_close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- behaviour ----------------------------------------------------------------------------

    def behave(self, mode, times=None, path=None, **opts):
        """Set a behaviour; with ``times`` only for the next N matching requests (queued)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        rule = Rule(mode, opts, path, times)
        with self._lock:
            if times is not None:
                if times > 0:
                    self._scripted.append(rule)
            elif path is None:
                self._persistent = [rule]
            else:
                self._persistent = [r for r in self._persistent if r.path != path]
                self._persistent.insert(0, rule)
        return self

    def reset(self):
        """Go back to "ok": clear behaviours, counters, recorded requests and reply settings."""
        with self._lock:
            self._clear()

    def _clear(self):
        self._persistent = []
        self._scripted = []
        self._requests = []
        self._counters = {"stream_write_failures": 0, "client_disconnects": 0,
                          "connections_accepted": 0}
        self._reply_text = None
        self._missing = set()
        self._now = {}     # path -> requests being answered now
        self._most = {}    # path -> the most ever answered at once

    def _next_behaviour(self, path):
        with self._lock:
            for rule in self._scripted:
                if rule.matches(path):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._scripted.remove(rule)
                    return rule.mode, dict(rule.opts)
            for rule in self._persistent:
                if rule.matches(path):
                    return rule.mode, dict(rule.opts)
        return "ok", {}

    @property
    def reply_text(self):
        with self._lock:
            return self._reply_text if self._reply_text is not None else f"Hello from {self.name}"

    @reply_text.setter
    def reply_text(self, text):
        with self._lock:
            self._reply_text = text

    @property
    def missing_models(self):
        """Models answered with the provider's 404; the live set, so ``.add()`` works."""
        with self._lock:
            return self._missing

    @missing_models.setter
    def missing_models(self, models):
        with self._lock:
            self._missing = set(models)

    # -- observation --------------------------------------------------------------------------

    @property
    def requests(self):
        with self._lock:
            return list(self._requests)

    def hits(self, path_substring=None):
        """Return how many requests arrived (whose path contains the substring)."""
        with self._lock:
            return sum(1 for r in self._requests
                       if path_substring is None or path_substring in r.path)

    @property
    def stream_write_failures(self):
        with self._lock:
            return self._counters["stream_write_failures"]

    @property
    def connections_accepted(self):
        """Connections clients opened (a client that reuses kept-alive ones opens few)."""
        with self._lock:
            return self._counters["connections_accepted"]

    @property
    def client_disconnects(self):
        """Times a client went away mid-response or while the fake was waiting."""
        with self._lock:
            return self._counters["client_disconnects"]

    def concurrent(self, path_substring=None):
        """Return how many requests (whose path contains the substring) are being answered now."""
        with self._lock:
            return sum(n for p, n in self._now.items()
                       if path_substring is None or path_substring in p)

    def max_concurrent(self, path):
        """Return the most requests to ``path`` that were ever being answered at once."""
        with self._lock:
            return self._most.get(path, 0)

    def wait_for(self, predicate, timeout=5.0, interval=0.02):
        """Poll ``predicate()`` until true or ``timeout``; return whether it came true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    # -- used by the handler ------------------------------------------------------------------

    def _record(self, method, path, headers, body):
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = RecordedRequest(method, path, Headers(headers.items()), parsed, body)
        with self._lock:
            self._requests.append(request)
        return request

    def _concurrent(self, path, delta):
        with self._lock:
            self._now[path] = self._now.get(path, 0) + delta
            self._most[path] = max(self._most.get(path, 0), self._now[path])

    def _count(self, counter):
        with self._lock:
            self._counters[counter] += 1

    def _track(self, connection, alive):
        with self._lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a fake LLM upstream until Ctrl-C.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--name", default="ollama", help='goes into replies: "Hello from NAME"')
    parser.add_argument("--mode", default="ok", choices=MODES, help="behaviour for every call")
    args = parser.parse_args(argv)
    fake = FakeUpstream(name=args.name, port=args.port).start()
    fake.behave(args.mode)
    print(f"fake upstream {args.name!r} listening on {fake.url}", flush=True)
    print(f"  OLLAMA_URL={fake.url}  OPENAI_BASE_URL={fake.url}/v1  "
          f"GOOGLE_BASE_URL={fake.url}/v1beta", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
