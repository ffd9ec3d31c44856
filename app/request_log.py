"""Request ids, the access line, HTTP metrics, and log lines that leak nothing.

Every log line of a request carries its ``X-Request-ID`` (taken from the
caller when present, sanitised and bounded, or generated). Every line,
traceback included, passes through the redactor, so an API key that
reaches a log call is replaced before it reaches the log, and has its
control characters escaped, so one record is always one line.
"""

import logging
import re
import sys
import time
import uuid

from flask import g, has_request_context, request

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:\-]")
MAX_ID_LENGTH = 64
# Callers can send any method token: label only the ones we serve.
_METHODS = frozenset(("GET", "POST", "OPTIONS", "HEAD"))
log = logging.getLogger("app.access")


def request_id_from(header):
    """Return a safe request id: the caller's, cleaned, or a new one."""
    cleaned = _UNSAFE_ID.sub("", header or "")[:MAX_ID_LENGTH]
    return cleaned or uuid.uuid4().hex


def printable(text, limit=200):
    """Return ``text`` with control and non-ASCII characters escaped, bounded."""
    return str(text)[:limit].encode("unicode_escape").decode("ascii")


# C0 and C1 controls (CR, LF, ESC, NEL, ...) and the Unicode line and
# paragraph separators: what could end a log line early or forge a new one.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    """Return ``text`` with every control character written as an escape (``\\r``, ``\\x1b``)."""
    return _CONTROLS.sub(_escape, text)


def _escape(match):
    return match.group().encode("unicode_escape").decode("ascii")


class RequestContextFilter(logging.Filter):
    """Add ``request_id`` to records."""

    def filter(self, record):
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


class SafeFormatter(logging.Formatter):
    """Format a record as exactly one line with no secret in it.

    The whole formatted text is cleaned, traceback included: an exception
    can carry upstream text or a key (``exc_info``), and any field that
    came from outside may hold a CR or LF that would forge another line.
    ``inner``, when given, formats the record first (gunicorn's own format).
    """

    def __init__(self, redactor, fmt=None, inner=None):
        super().__init__(fmt)
        self.redactor = redactor
        self.inner = inner

    def format(self, record):
        text = self.inner.format(record) if self.inner else super().format(record)
        return escape_controls(self.redactor.redact(text))


LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] [%(request_id)s] %(name)s: %(message)s"
# gunicorn logs what escapes the app (an error inside a stream, a crash)
# with its traceback through its own handlers: clean those lines too.
SERVER_LOGGERS = ("gunicorn.error",)


def configure_logging(level, redactor):
    """Send the ``app`` loggers to stderr with request ids; clean every line; idempotent."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_mana_llm", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._mana_llm = True
    handler.setFormatter(SafeFormatter(redactor, LOG_FORMAT))
    handler.addFilter(RequestContextFilter())
    logger.addHandler(handler)
    for name in SERVER_LOGGERS:
        for server_handler in logging.getLogger(name).handlers:
            inner = server_handler.formatter or logging.Formatter()
            if isinstance(inner, SafeFormatter):
                inner = inner.inner
            server_handler.setFormatter(SafeFormatter(redactor, inner=inner))


class StartClock:
    """WSGI middleware: note when the request reached the app, before Flask's work."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        environ["mana_llm.started"] = time.perf_counter()
        return self.wsgi_app(environ, start_response)


def install_request_log(app, recorder):
    """Give every request an id, and log and count it when it is answered."""
    app.wsgi_app = StartClock(app.wsgi_app)

    @app.before_request
    def _start():
        g.started = request.environ.get("mana_llm.started") or time.perf_counter()
        g.request_id = request_id_from(request.headers.get("X-Request-ID"))

    @app.after_request
    def _finish(response):
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in _METHODS else "other"
        recorder.http_request(method, endpoint, response.status_code, seconds)
        caller = g.get("caller")
        log.info("%s %s %s %.1fms model=%s caller=%s", request.method, printable(request.path),
                 response.status_code, seconds * 1000, g.get("resolved", "-"),
                 caller.name if caller is not None else "-")
        return response
