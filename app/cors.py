"""CORS for the origins in CORS_ORIGINS (``*`` allows any); never with credentials."""

import re

from flask import request

ALLOW_HEADERS = ("authorization", "content-type", "x-api-key", "x-request-id")
ALLOW_METHODS = "GET, POST, OPTIONS"
EXPOSE_HEADERS = "X-Mana-LLM-Resolved, X-Request-ID, Server-Timing, Retry-After"
# A header name is an RFC 9110 token; anything else a browser could not
# have asked for, so it is dropped rather than echoed into a header.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
MAX_REQUESTED_HEADERS = 32


def allowed_headers(requested):
    """Return the Allow-Headers value: ours plus the (sanitised) ones a preflight asks for."""
    names = list(ALLOW_HEADERS)
    for name in (requested or "").split(",")[:MAX_REQUESTED_HEADERS]:
        name = name.strip().lower()
        if _TOKEN.fullmatch(name) and name not in names:
            names.append(name)
    return ", ".join(names)


def install_cors(app, origins):
    """Answer preflights and add CORS headers for allowed origins."""
    if not origins:
        return
    wildcard = "*" in origins
    allowed = frozenset(origins)

    def _allowed(origin):
        return bool(origin) and (wildcard or origin in allowed)

    @app.before_request
    def _preflight():
        if request.method == "OPTIONS" and _allowed(request.headers.get("Origin")):
            return "", 204
        return None

    @app.after_request
    def _headers(response):
        # Whether the CORS headers are present depends on Origin, for
        # refused origins too: a shared cache must not reuse one for the other.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if not _allowed(origin):
            return response
        # With a wildcard, answer "*" rather than echo what the caller sent.
        response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if request.method == "OPTIONS":
            response.vary.add("Access-Control-Request-Headers")
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = allowed_headers(
                request.headers.get("Access-Control-Request-Headers"))
            response.headers["Access-Control-Max-Age"] = "600"
        return response
