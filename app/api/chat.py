"""``POST /v1/chat/completions``: plain and streamed (SSE)."""

import json
import os
import time

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from app import errors
from app.cache import HEADER, as_answer, as_chunks, complete_answer, plan_chat
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
    return served_headers(outcome.entry.label, outcome.upstream_seconds)


def served_headers(label, upstream_seconds):
    """Return the headers of an answer that ``label`` gave (live, or kept by the cache)."""
    # The label fits a header: model strings and alias entries are printable ASCII.
    g.resolved = label
    # The worker matters to whoever reads health: each worker keeps its own.
    return {"X-Mana-LLM-Resolved": label, "X-Mana-LLM-Worker": str(os.getpid()),
            "Server-Timing": server_timing(g.started, upstream_seconds)}


def hit_headers(gateway, entry):
    """Return the headers of a cache hit: the original entry's, the cache's and the age."""
    gateway.cache.saved(entry, g.caller.prices)
    return {**served_headers(entry.resolved, 0.0), HEADER: "hit",
            "Age": str(entry.age(time.time()))}


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
    g.caller.admit(route.asked)  # its models and quotas, before any upstream call (or hit)
    plan = plan_chat(body, route, gateway.aliases, g.caller.name,
                     request.headers.get("Cache-Control"))
    hit = gateway.cache.lookup(plan)
    if hit is not None:
        return _replay(gateway, hit, body)
    if body.get("stream"):
        return _stream(gateway, body, route, plan)
    # The caller's socket: one who leaves while waiting for a slot gives it up.
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: provider.chat(body, entry.model, call),
        client=request.environ.get("gunicorn.socket"),
        can_serve=lambda provider, model: capable(provider, body, model))
    answer = outcome.result
    gateway.recorder.tokens(outcome.entry, answer.get("usage"), g.caller)
    if complete_answer(answer):
        gateway.cache.keep(plan, "answer", answer, outcome.entry.label, answer.get("usage"))
    return Response(json.dumps(answer, separators=(",", ":")), mimetype="application/json",
                    headers={**answer_headers(outcome), HEADER: plan.result})


def _stream(gateway, body, route, plan):
    # The caller's socket (gunicorn's): a stream whose caller left is closed at once.
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: prime(provider.stream_chat(body, entry.model, call)),
        streaming=True, client=request.environ.get("gunicorn.socket"), payer=g.caller,
        can_serve=lambda provider, model: capable(provider, body, model))
    tape = gateway.cache.tape(plan, outcome.entry.label)
    # The request context stays with the stream, so its log lines keep the request id.
    events = stream_with_context(_frame(outcome.result, _include_usage(body), tape))
    return Response(events, mimetype="text/event-stream", headers={
        **answer_headers(outcome), HEADER: plan.result, **STREAM_HEADERS})


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _include_usage(body):
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _visible(chunk, include_usage):
    """Return the chunk as the caller asked for it, or None: usage only when asked."""
    if not include_usage:
        if not chunk.get("choices"):
            return None
        chunk.pop("usage", None)
    return chunk


def _frame(stream, include_usage, tape=None):
    """Yield the committed stream as SSE; a failure after commit ends it with an error event.

    ``tape`` (the cache's) sees every chunk, and is told the stream is done
    only when it ended cleanly: a broken or abandoned stream is never kept.
    """
    try:
        for chunk in stream:
            if tape is not None:
                tape.add(chunk)
            visible = _visible(chunk, include_usage)
            if visible is not None:
                yield sse_event(visible)
        if tape is not None:
            tape.done()
    except errors.GatewayError as error:
        yield error_event(error)
    finally:
        stream.close()
    yield DONE


def _replay(gateway, entry, body):
    """Answer with a kept entry, in the shape this request asks for (plain or SSE)."""
    headers = hit_headers(gateway, entry)
    if not body.get("stream"):
        answer = entry.data if entry.kind == "answer" else as_answer(entry.data)
        return Response(json.dumps(answer, separators=(",", ":")),
                        mimetype="application/json", headers=headers)
    chunks = entry.data if entry.kind == "chunks" else as_chunks(entry.data)
    include_usage = _include_usage(body)
    events = (sse_event(c) for c in chunks if _visible(c, include_usage) is not None)
    return Response(_then_done(events), mimetype="text/event-stream",
                    headers={**headers, **STREAM_HEADERS})


def _then_done(events):
    yield from events
    yield DONE
