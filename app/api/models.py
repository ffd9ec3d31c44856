"""``GET /v1/models``, ``GET /v1/models/<id>`` and ``POST /v1/embeddings``."""

import base64
import dataclasses
import logging
import struct
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, current_app, g, jsonify, request

from app import errors
from app.api.chat import hit_headers
from app.cache import HEADER, plan_embeddings
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
    data = [_model(name, "mana-llm") for name in gateway.aliases.aliases]
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
    route = gateway.route(model_id)
    if route.alias is not None:
        return jsonify(_model(route.alias, "mana-llm"))
    entry = route.entries[0]
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
    route = gateway.route(body.get("model"))
    g.caller.admit(route.asked)  # its models and quotas, before any upstream call (or hit)
    plan = plan_embeddings(body, inputs, route, gateway.aliases, g.caller.name,
                           request.headers.get("Cache-Control"), gateway.cache.embeddings_ttl)
    hit = gateway.cache.lookup(plan)
    if hit is not None:
        response = _vectors(hit.data["vectors"], hit.data["prompt_tokens"], hit.resolved,
                            encoding)
        response.headers.update(hit_headers(gateway, hit))
        return response
    # Vectors from two models do not mix: never fall back to a different model.
    first = route.entries[0].model
    route = dataclasses.replace(route, entries=tuple(e for e in route.entries
                                                     if e.model == first))
    outcome = gateway.walker.walk(
        route, lambda provider, entry, call: provider.embed(inputs, entry.model, body, call),
        client=request.environ.get("gunicorn.socket"))
    vectors, prompt_tokens = outcome.result
    gateway.recorder.tokens(outcome.entry, {"prompt_tokens": prompt_tokens}, g.caller)
    g.resolved = outcome.entry.label
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    gateway.cache.keep(plan, "vectors", {"vectors": vectors, "prompt_tokens": prompt_tokens},
                       outcome.entry.label, usage)
    response = _vectors(vectors, prompt_tokens, outcome.entry.label, encoding)
    response.headers["X-Mana-LLM-Resolved"] = outcome.entry.label
    response.headers[HEADER] = plan.result
    return response


def _vectors(vectors, prompt_tokens, label, encoding):
    """Return the embeddings response for float vectors, in the encoding asked for."""
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
                 for i, v in enumerate(vectors)],
        "model": label,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
