"""``POST /v1/chat/completions``: plain and streamed (SSE)."""

import json
import os
import time

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from app import errors
from app.streaming import DONE, error_event, prime, sse_event
from app.validation import chat_request, parse_json_body

bp = Blueprint("chat", __name__)


def server_timing(started, upstream_seconds):
    """Return the Server-Timing value: what the gateway added, and the upstream's share."""
    total = time.perf_counter() - started
    gateway = max(0.0, total - upstream_seconds)
    return f"gateway;dur={gateway * 1000:.2f}, upstream;dur={upstream_seconds * 1000:.2f}"


def answer_headers(outcome):
    """Return the headers every answer carries: which entry and which worker served it."""
    # The label fits a header: model strings and alias entries are printable ASCII.
    g.resolved = outcome.entry.label
    # The worker matters to whoever reads health: each worker keeps its own.
    return {"X-Mana-LLM-Resolved": outcome.entry.label, "X-Mana-LLM-Worker": str(os.getpid()),
            "Server-Timing": server_timing(g.started, outcome.upstream_seconds)}


@bp.post("/v1/chat/completions")
def chat_completions():
    gateway = current_app.extensions["mana_llm"]
    body = chat_request(parse_json_body(request))
    route = gateway.route(body.get("model"))
    g.caller.admit(route.asked)  # its models and quotas, before any upstream call
    if body.get("stream"):
        return _stream(gateway, body, route)
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: provider.chat(body, entry.model, call))
    answer = outcome.result
    gateway.recorder.tokens(outcome.entry, answer.get("usage"), g.caller)
    return Response(json.dumps(answer, separators=(",", ":")), mimetype="application/json",
                    headers=answer_headers(outcome))


def _stream(gateway, body, route):
    # The caller's socket (gunicorn's): a stream whose caller left is closed at once.
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: prime(provider.stream_chat(body, entry.model, call)),
        streaming=True, client=request.environ.get("gunicorn.socket"), payer=g.caller)
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
