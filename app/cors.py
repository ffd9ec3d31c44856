"""CORS for the origins in CORS_ORIGINS (``*`` allows any)."""

from flask import request

ALLOW_HEADERS = "Authorization, Content-Type, X-API-Key, X-Request-ID"
EXPOSE_HEADERS = "X-Mana-LLM-Resolved, X-Request-ID, Server-Timing, Retry-After"


def install_cors(app, origins):
    """Answer preflights and add CORS headers for allowed origins."""
    if not origins:
        return
    allowed = set(origins)

    def _allowed(origin):
        return origin and ("*" in allowed or origin in allowed)

    @app.before_request
    def _preflight():
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and _allowed(origin):
            return "", 204
        return None

    @app.after_request
    def _headers(response):
        origin = request.headers.get("Origin")
        if _allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
        return response
