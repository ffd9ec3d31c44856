"""Who is calling (SPEC §9, §14): the caller a presented key belongs to, as ``g.caller``.

The callers come from ``KEYS_PATH``, or ``GPU_API_KEY`` alone (one caller
named ``default``); with neither, or ``GPU_REQUIRE_AUTH=false``, auth is
off and every request is the caller ``anonymous``. Open paths and CORS
preflights name no caller.
"""

from flask import g, request

from app import errors
from app.callers import ANONYMOUS
from app.quotas import Tab

OPEN_PATHS = ("/health", "/metrics")
EXTENSION = "mana_llm_callers"


def presented_key():
    """Return the key the caller presented, from any of the three places."""
    key = request.headers.get("X-API-Key")
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.args.get("api_key", "")


def install_auth(app, book):
    """Set ``g.caller`` (a Tab) for every request but the open ones, or answer 401."""
    app.extensions[EXTENSION] = book

    @app.before_request
    def _identify():
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return None
        if book.table.required:
            caller = book.table.find(presented_key())
            if caller is None:
                raise errors.Unauthorized("missing or invalid API key: send it as "
                                          "'Authorization: Bearer <key>' or 'X-API-Key'")
        else:
            caller = book.table.callers[ANONYMOUS]
        g.caller = Tab(caller, book.quotas, book.recorder, book.prices)
        return None

    @app.after_request
    def _settle(response):
        tab = g.get("caller")
        if tab is not None:
            book.recorder.caller_request(tab.name, response.status_code)
            # After the last byte: a stream's tokens are known only then.
            response.call_on_close(tab.close)
        return response
