"""``GET /v1/models``, ``GET /v1/models/<id>`` and ``POST /v1/embeddings``."""

import base64
import logging
import struct
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, current_app, g, jsonify, request

from app import errors
from app.providers import KNOWN_PROVIDERS
from app.routing.aliases import resolve_chain
from app.validation import embeddings_request, parse_json_body

bp = Blueprint("models", __name__)
log = logging.getLogger(__name__)


def _model(model_id, owner):
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def _list_one(gateway, name):
    """Return a provider's models as entries, or [] when it cannot list them now."""
    provider = gateway.providers[name]
    if gateway.health.in_backoff(name):
        return []
    try:
        models = provider.list_models(timeout=gateway.config["PROBE_TIMEOUT"])
        return [_model(f"{name}/{m}", name) for m in models]
    except errors.GatewayError as exc:
        log.info("listing models of %s failed: %s", name, exc.message)
        return []


def all_models(gateway):
    """Return every configured provider's models (in parallel) plus every alias."""
    names = list(gateway.configured)
    data = [_model(name, "mana-llm") for name in gateway.aliases.table.aliases]
    if names:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for models in pool.map(lambda n: _list_one(gateway, n), names):
                data.extend(models)
    return data


@bp.get("/v1/models")
def list_models():
    gateway = current_app.extensions["mana_llm"]
    return jsonify({"object": "list", "data": all_models(gateway)})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id):
    gateway = current_app.extensions["mana_llm"]
    if model_id in gateway.aliases.table.aliases:
        return jsonify(_model(model_id, "mana-llm"))
    _, entries = resolve_chain(model_id, gateway.aliases.table, KNOWN_PROVIDERS)
    entry = entries[0]
    if entry.provider in gateway.configured:
        for model in _list_one(gateway, entry.provider):
            if model["id"] == entry.label:
                return jsonify(model)
    raise errors.ModelNotFound(f"model {entry.label!r} is not served here", param="model")


def _encode(vector, encoding):
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@bp.post("/v1/embeddings")
def embeddings():
    gateway = current_app.extensions["mana_llm"]
    body = parse_json_body(request)
    inputs, encoding = embeddings_request(body)
    asked = body.get("model") or gateway.aliases.table.default
    alias, entries = resolve_chain(body.get("model"), gateway.aliases.table, KNOWN_PROVIDERS)
    g.caller.admit(asked)  # its models and quotas, before any upstream call
    # Vectors from two models do not mix: never fall back to a different model.
    entries = [e for e in entries if e.model == entries[0].model]

    def call(provider, entry):
        return provider.embed(inputs, entry.model, body)

    outcome = gateway.walker.walk(entries, call, asked=asked, alias=alias)
    vectors, prompt_tokens = outcome.result
    gateway.recorder.tokens(outcome.entry, {"prompt_tokens": prompt_tokens}, g.caller)
    g.resolved = outcome.entry.label
    response = jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
                 for i, v in enumerate(vectors)],
        "model": outcome.entry.label,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
    response.headers["X-Mana-LLM-Resolved"] = outcome.entry.label
    return response
