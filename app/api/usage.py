"""``GET /v1/usage``: a caller's own usage and limits this minute and day.

The caller named by ``ADMIN_KEY_NAME`` may see every caller's, or one
with ``?caller=name``; anyone else asking for another caller is 403.
"""

from flask import Blueprint, current_app, g, jsonify, request

from app import errors
from app.auth import EXTENSION

bp = Blueprint("usage", __name__)


def visible_callers(book, me, asked, admin):
    """Return the callers whose usage ``me`` asked for and may see."""
    if asked is None:
        return list(book.table.callers.values()) if me == admin else [book.table.callers[me]]
    if asked != me and me != admin:
        raise errors.Forbidden("only the admin caller may see another caller's usage",
                               param="caller")
    caller = book.table.callers.get(asked)
    if caller is None:
        raise errors.NotFound(f"no caller named {asked[:40]!r}", param="caller")
    return [caller]


@bp.get("/v1/usage")
def usage():
    book = current_app.extensions[EXTENSION]
    gateway = current_app.extensions["mana_llm"]
    admin = gateway.config.get("ADMIN_KEY_NAME") or None
    callers = visible_callers(book, g.caller.name, request.args.get("caller"), admin)
    return jsonify({"object": "usage", "callers": book.quotas.usage(callers)})
