"""``GET /v1/aliases``: the alias table this worker serves."""

from flask import Blueprint, current_app, jsonify

bp = Blueprint("aliases", __name__)


@bp.get("/v1/aliases")
def list_aliases():
    table = current_app.extensions["mana_llm"].aliases
    return jsonify({
        "default": table.default,
        "aliases": [{"name": a.name, "description": a.description,
                     "chain": [e.label for e in a.chain]}
                    for a in table.aliases.values()],
    })
