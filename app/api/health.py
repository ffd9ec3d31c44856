"""``GET /v1/health`` (the health cache in full) and ``GET /health`` (liveness)."""

from flask import Blueprint, current_app, jsonify

import app as package

bp = Blueprint("health", __name__)


def provider_states(gateway):
    """Return the health of every configured provider."""
    snapshot = gateway.health.snapshot()
    return {name: snapshot[name] for name in gateway.configured if name in snapshot}


def overall(states):
    """Return healthy, degraded (some providers down) or unhealthy (all down)."""
    down = sum(1 for s in states.values() if s["status"] != "healthy")
    if not down:
        return "healthy"
    return "unhealthy" if down == len(states) else "degraded"


@bp.get("/v1/health")
def detailed_health():
    gateway = current_app.extensions["mana_llm"]
    states = provider_states(gateway)
    body = {"status": overall(states), "providers": states}
    # Capped providers: calls in flight and the cap (one board read when caps are set).
    for name, load in gateway.capacity.status().items():
        if name in states:
            states[name].update(load)
    board = gateway.health.board_status()  # no board round trip: the last known state
    if board is not None:
        body["shared_state"] = board
    return jsonify(body)


@bp.get("/health")
def liveness():
    states = provider_states(current_app.extensions["mana_llm"])
    return jsonify({"status": overall(states), "service": "mana-llm",
                    "version": package.__version__,
                    "providers": {name: s["status"] for name, s in states.items()}})
