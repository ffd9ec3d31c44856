"""``POST /v1/chat/completions``: plain and streamed (SSE)."""

import json
import logging
import time

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from app import errors
from app.providers import KNOWN_PROVIDERS
from app.routing.aliases import resolve_chain
from app.routing.fallback import SHAPE_ERRORS, misshapen
from app.streaming import DONE, error_event, prime, sse_event
from app.validation import chat_request, parse_json_body

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)


def server_timing(started, upstream_seconds):
    """Return the Server-Timing value: what the gateway added, and the upstream's share."""
    total = time.perf_counter() - started
    gateway = max(0.0, total - upstream_seconds)
    return f"gateway;dur={gateway * 1000:.2f}, upstream;dur={upstream_seconds * 1000:.2f}"


@bp.post("/v1/chat/completions")
def chat_completions():
    gateway = current_app.extensions["mana_llm"]
    body = chat_request(parse_json_body(request))
    asked = body.get("model") or gateway.aliases.table.default
    alias, entries = resolve_chain(body.get("model"), gateway.aliases.table, KNOWN_PROVIDERS)
    g.caller.admit(asked)  # its models and quotas, before any upstream call
    if body.get("stream"):
        return _stream(gateway, body, asked, alias, entries)

    def call(provider, entry):
        provider.check_capabilities(body, entry.model)
        return provider.chat(body, entry.model)

    outcome = gateway.walker.walk(entries, call, asked=asked, alias=alias)
    answer = outcome.result
    gateway.recorder.tokens(outcome.entry, answer.get("usage"), g.caller)
    g.resolved = outcome.entry.label
    return Response(json.dumps(answer, separators=(",", ":")), mimetype="application/json",
                    headers={"X-Mana-LLM-Resolved": outcome.entry.label,
                             "Server-Timing": server_timing(g.started,
                                                            outcome.upstream_seconds)})


def _stream(gateway, body, asked, alias, entries):
    def call(provider, entry):
        provider.check_capabilities(body, entry.model)
        return prime(provider.stream_chat(body, entry.model))

    outcome = gateway.walker.walk(entries, call, asked=asked, alias=alias, streaming=True)
    g.resolved = outcome.entry.label
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    # The request context stays with the stream, so its log lines keep the request id.
    events = stream_with_context(_relay(gateway, outcome, asked, include_usage))
    return Response(events, mimetype="text/event-stream", headers={
        "X-Mana-LLM-Resolved": outcome.entry.label,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "Server-Timing": server_timing(g.started, outcome.upstream_seconds),
    })


def _relay(gateway, outcome, asked, include_usage):
    """Yield the committed stream as SSE; a later failure ends it with an error event."""
    stream = outcome.result
    entry = outcome.entry
    try:
        for chunks in (stream.head, stream.rest):
            for chunk in chunks:
                usage = chunk.get("usage")
                if usage:
                    gateway.recorder.tokens(entry, usage, g.caller)
                if not include_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk.pop("usage", None)
                yield sse_event(chunk)
        gateway.walker.record_stream_success(entry)
    except (errors.GatewayError,) + SHAPE_ERRORS as error:
        # Committed: never splice in another provider; tell the caller and
        # count it against this provider's health.
        if not isinstance(error, errors.GatewayError):
            error = misshapen(entry, error)
        gateway.walker.record_stream_failure(entry, error, asked)
        log.warning("stream from %s failed after it started: %s", entry.label, error.message)
        yield error_event(error)
    finally:
        stream.close()
    yield DONE
