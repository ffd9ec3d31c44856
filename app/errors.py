"""One exception tree for the gateway, and the JSON error handlers.

Each class carries its facts: the HTTP status the caller sees, the
``kind`` existing consumers read, and what the fallback walk does when a
provider raises it (``on_failure``):

- ``"trip"``: retryable, and evidence the provider is unwell: record a
  failure in the health cache and try the next entry;
- ``"cooldown"``: a 429; skip the provider for its Retry-After (not a
  failure) and try the next entry;
- ``"next"``: try the next entry, but the provider is alive (an upstream
  404 for a model that is not pulled);
- ``"stop"``: not retryable; return it to the caller, health untouched.
"""

import json
import math

from werkzeug.exceptions import HTTPException

# No upstream can take itself out of rotation, or send a caller away, for longer.
MAX_RETRY_AFTER = 3600.0


def retry_after_header(seconds):
    """Return ``{"Retry-After": whole seconds, rounded up}``, or {} when unknown."""
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(min(seconds, MAX_RETRY_AFTER))))}


class GatewayError(Exception):
    """Base of every error the gateway answers with."""

    status = 500
    kind = "server_error"
    on_failure = "stop"
    reason = "error"

    def __init__(self, message, *, param=None, reason=None):
        super().__init__(message)
        self.message = str(message)
        self.param = param
        if reason is not None:
            self.reason = reason

    def body(self):
        """Return both envelopes: ``error`` for OpenAI clients, ``detail`` for ours."""
        return {
            "error": {"message": self.message, "type": self.kind,
                      "code": self.kind, "param": self.param},
            "detail": {"kind": self.kind, "message": self.message},
        }

    def headers(self):
        """Return extra response headers."""
        return {}


class InvalidRequest(GatewayError):
    """The caller's request is malformed or out of range."""

    status = 400
    kind = "invalid_request"


class CapabilityError(GatewayError):
    """The request needs something the model cannot do (tools, images)."""

    status = 400
    kind = "capability"
    reason = "capability"


class Unauthorized(GatewayError):
    """The caller did not present the gateway's API key."""

    status = 401
    kind = "unauthorized"


class Forbidden(GatewayError):
    """The caller's key may not use what it asked for (a model outside its globs)."""

    status = 403
    kind = "forbidden"


class ModelNotFound(GatewayError):
    """No such alias, provider or model."""

    status = 404
    kind = "model_not_found"


class NotFound(GatewayError):
    """No such route."""

    status = 404
    kind = "not_found"


class MethodNotAllowed(GatewayError):
    """The route exists but not for this method."""

    status = 405
    kind = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    """The request body exceeds MAX_BODY_BYTES."""

    status = 413
    kind = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    """The body is not JSON."""

    status = 415
    kind = "invalid_request"


class Blocked(GatewayError):
    """The upstream refused to answer on safety grounds; retrying will not help."""

    status = 422
    kind = "blocked"
    reason = "blocked"


class UpstreamInvalidRequest(InvalidRequest):
    """The upstream rejected the request itself (400/422): the caller must change it."""


class UpstreamModelNotFound(ModelNotFound):
    """The upstream is alive but does not have this model; another entry may."""

    on_failure = "next"
    reason = "model-not-found"


class UpstreamAuthError(GatewayError):
    """The gateway's own upstream credentials were refused: not the caller's fault."""

    status = 502
    kind = "auth"
    reason = "upstream-auth"


class Truncated(GatewayError):
    """The upstream hit its token limit before producing any text."""

    status = 502
    kind = "truncated"
    reason = "truncated"


class UpstreamError(GatewayError):
    """The upstream failed or answered wrongly; safe to retry elsewhere."""

    status = 502
    kind = "upstream_error"
    on_failure = "trip"
    reason = "upstream-error"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached or did not answer in time."""


class CallerLeft(GatewayError):
    """The caller closed its connection: the call was abandoned; nobody is told."""

    reason = "caller-left"


class RateLimited(GatewayError):
    """The upstream (or every upstream tried) is rate-limiting us."""

    status = 429
    kind = "rate_limit"
    on_failure = "cooldown"
    reason = "rate-limited"

    def __init__(self, message, *, retry_after=None, **kw):
        super().__init__(message, **kw)
        self.retry_after = None if retry_after is None else min(retry_after, MAX_RETRY_AFTER)

    def headers(self):
        return retry_after_header(self.retry_after)


class QuotaExceeded(RateLimited):
    """The caller used up one of its own limits; retry once the window frees."""

    reason = "quota"

    def __init__(self, message, *, limit, retry_after, **kw):
        super().__init__(message, retry_after=retry_after, **kw)
        self.limit = limit

    def body(self):
        body = super().body()
        body["detail"].update(reason="quota", limit=self.limit)
        return body

    def headers(self):
        # Unlike a walked chain, waiting does help: the window frees.
        return {"x-should-retry": "true", **super().headers()}


class ChainExhausted(GatewayError):
    """Every entry of the chain was skipped or failed."""

    status = 503
    kind = "no_healthy_provider"

    def __init__(self, message, *, attempts, retry_after=None, **kw):
        super().__init__(message, **kw)
        self.attempts = attempts
        self.retry_after = retry_after

    def body(self):
        body = super().body()
        body["error"]["attempts"] = self.attempts
        body["detail"]["attempts"] = self.attempts
        return body

    def headers(self):
        # The gateway already walked the whole chain: an SDK retrying
        # would multiply the load for nothing.
        return {"x-should-retry": "false", **retry_after_header(self.retry_after)}


class ChainRateLimited(ChainExhausted):
    """Every attempt actually made was rate-limited."""

    status = 429
    kind = "rate_limit"


def error_response(error):
    """Return a Flask response tuple for a GatewayError.

    Upstream text in a message was redacted where it entered (the provider edge).
    """
    payload = json.dumps(error.body(), ensure_ascii=True)
    headers = {"Content-Type": "application/json"}
    headers.update(error.headers())
    return payload, error.status, headers


_HTTP_ERRORS = {400: InvalidRequest, 404: NotFound, 405: MethodNotAllowed,
                413: PayloadTooLarge, 415: UnsupportedMediaType}


def register_error_handlers(app):
    """Answer every error, ours or Werkzeug's or a bug, with the JSON envelopes."""

    @app.errorhandler(GatewayError)
    def _gateway_error(error):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error):
        cls = _HTTP_ERRORS.get(error.code, InvalidRequest)
        ours = cls(error.description or error.name)
        ours.status = error.code
        return error_response(ours)

    @app.errorhandler(Exception)
    def _unexpected(error):
        app.logger.exception("unhandled error")
        return error_response(GatewayError("internal error"))
