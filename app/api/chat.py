"""``POST /v1/chat/completions``: plain and streamed (SSE)."""

import json
import os
import time
from urllib.parse import quote

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from app import errors
from app.streaming import DONE, error_event, prime, sse_event
from app.validation import chat_request, parse_json_body

bp = Blueprint("chat", __name__)
# What a header value may carry as is; anything else in a model name is percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F))


def server_timing(started, upstream_seconds):
    """Return the Server-Timing value: what the gateway added, and the upstream's share."""
    total = time.perf_counter() - started
    gateway = max(0.0, total - upstream_seconds)
    return f"gateway;dur={gateway * 1000:.2f}, upstream;dur={upstream_seconds * 1000:.2f}"


def answer_headers(outcome):
    """Return the headers every answer carries: which entry and which worker served it."""
    g.resolved = outcome.entry.label
    # Headers are Latin-1: a model named in any other script must not turn an
    # answer the upstream already gave (and billed) into a 500.
    resolved = quote(outcome.entry.label, safe=_HEADER_SAFE)
    # The worker matters to whoever reads health: each worker keeps its own.
    return {"X-Mana-LLM-Resolved": resolved, "X-Mana-LLM-Worker": str(os.getpid()),
            "Server-Timing": server_timing(g.started, outcome.upstream_seconds)}


def capable(provider, body, model):
    """Tell whether ``model`` of ``provider`` can take ``body`` (tools, say), before any call."""
    try:
        provider.check_capabilities(body, model)
    except errors.CapabilityError:
        return False
    return True


@bp.post("/v1/chat/completions")
def chat_completions():
    gateway = current_app.extensions["mana_llm"]
    body = chat_request(parse_json_body(request))
    route = gateway.route(body.get("model"))
    if body.get("stream"):
        return _stream(gateway, body, route)
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: provider.chat(body, entry.model, call),
        can_serve=lambda provider, model: capable(provider, body, model))
    answer = outcome.result
    gateway.recorder.tokens(outcome.entry, answer.get("usage"))
    return Response(json.dumps(answer, separators=(",", ":")), mimetype="application/json",
                    headers=answer_headers(outcome))


def _stream(gateway, body, route):
    # The caller's socket (gunicorn's): a stream whose caller left is closed at once.
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: prime(provider.stream_chat(body, entry.model, call)),
        streaming=True, caller=request.environ.get("gunicorn.socket"),
        can_serve=lambda provider, model: capable(provider, body, model))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    # The request context stays with the stream, so its log lines keep the request id.
    events = stream_with_context(_frame(outcome.result, include_usage))
    return Response(events, mimetype="text/event-stream", headers={
        **answer_headers(outcome), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _frame(stream, include_usage):
    """Yield the committed stream as SSE; a failure after commit ends it with an error event."""
    try:
        for chunk in stream:
            if not include_usage:
                if not chunk.get("choices"):
                    continue
                chunk.pop("usage", None)
            yield sse_event(chunk)
    except errors.GatewayError as error:
        yield error_event(error)
    finally:
        stream.close()
    yield DONE
