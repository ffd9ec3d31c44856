"""The gateway's own API key (SPEC §9): off unless GPU_API_KEY is set."""

import hmac

from flask import request

from app import errors

OPEN_PATHS = ("/health", "/metrics")


def presented_key():
    """Return the key the caller presented, from any of the three places."""
    key = request.headers.get("X-API-Key")
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.args.get("api_key", "")


def install_auth(app, api_key, required):
    """Require ``api_key`` on every path but the open ones, compared in constant time."""
    if not api_key or not required:
        return
    expected = api_key.encode("utf-8")

    @app.before_request
    def _check_key():
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return None
        given = presented_key().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise errors.Unauthorized("missing or invalid API key: send it as "
                                      "'Authorization: Bearer <key>' or 'X-API-Key'")
        return None
