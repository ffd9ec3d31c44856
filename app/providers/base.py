"""What every provider shares: the transport, and how an upstream failure
becomes one of our errors.

A provider is translation plus a thin transport. ``Transport`` owns the
pooled connection, the timeouts and the translation of ``requests`` and
``urllib3`` exceptions into ``app.errors`` (the edge where they occur), so
the router only ever sees our exception tree.
"""

import email.utils
import json
import math
import re
import socket
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from app import errors
from app.providers.inflight import POOL_CLASSES, current_call

_READ_SIZE = 65536
_DRAIN_TIMEOUT = 0.25
# An upstream cannot take itself out of rotation for longer than this.
MAX_RETRY_AFTER = 3600.0
_RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"')


class Provider:
    """Base of the provider adapters; subclasses translate, ``Transport`` sends."""

    kind = "base"

    def __init__(self, name, transport, *, configured=True, stream_idle_timeout=60.0):
        self.name = name
        self.transport = transport
        self.configured = configured
        self.stream_idle_timeout = stream_idle_timeout

    def check_capabilities(self, body, model):
        """Raise CapabilityError if ``model`` cannot serve ``body``."""

    def chat(self, body, model):
        """Return an OpenAI ``chat.completion`` dict for ``body``."""
        raise NotImplementedError

    def stream_chat(self, body, model):
        """Yield OpenAI ``chat.completion.chunk`` dicts; close() closes upstream."""
        raise NotImplementedError

    def embed(self, inputs, model, body):
        """Return ``(vectors, prompt_tokens)`` for a list of strings."""
        raise NotImplementedError

    def list_models(self, timeout=None):
        """Return the model names the upstream serves (``timeout`` bounds the call)."""
        raise NotImplementedError

    def probe(self, timeout):
        """Raise an UpstreamError unless the upstream answers below 500."""
        raise NotImplementedError

    def close(self):
        """Close pooled connections."""
        self.transport.close()


def parse_retry_after(value, default, now=None):
    """Return seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if not value:
        return default
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), MAX_RETRY_AFTER) if math.isfinite(seconds) else default
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return default
    if when is None:
        return default
    now = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


def _as_text(raw):
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def upstream_message(raw):
    """Return the human message of an upstream error body (any provider's shape)."""
    text = _as_text(raw)
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "no message"
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail", doc))
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        if isinstance(err, str):
            return err[:500]
    return text.strip()[:500]


def _retry_delay_in_body(text, default):
    """Return Gemini's ``retryDelay`` ("39s") from an error body, else ``default``."""
    match = _RETRY_DELAY.search(text)
    return float(match.group(1)) if match else default


def error_from_status(status, raw, headers, *, provider, model, cooldown):
    """Return the error for an upstream answer with status >= 400.

    This is the one place an upstream HTTP status is classified; the
    error's class then says whether the walk trips, moves on or stops.
    """
    text = _as_text(raw)
    message = upstream_message(text)
    where = f"{provider}/{model}"
    if status == 429:
        wait = parse_retry_after(headers.get("Retry-After"), None)
        if wait is None:
            wait = _retry_delay_in_body(text, cooldown)
        return errors.RateLimited(f"{where} is rate-limited: {message}",
                                  retry_after=wait)
    # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
    if status in (401, 403) or (status == 400 and "API_KEY_INVALID" in text):
        return errors.UpstreamAuthError(
            f"{provider} refused the gateway's credentials ({status}): {message}")
    if status == 404:
        return errors.UpstreamModelNotFound(f"{where} not found upstream: {message}")
    if status == 408 or status >= 500:
        return errors.UpstreamError(f"{where} failed with HTTP {status}: {message}",
                                    reason=f"HTTP {status}")
    return errors.UpstreamInvalidRequest(message, reason=f"HTTP {status}")


class Transport:
    """One provider's pooled ``requests.Session``, its timeouts and its errors.

    One Session per provider is shared by the worker's threads. ``requests``
    does not promise a shared Session is thread-safe; what is unsafe in it
    is the cookie jar and mutating its settings. Calls go straight to the
    session's adapter (see ``_send``), so the jar is never touched, nothing
    is mutated after construction, and the urllib3 pool under the adapter
    is thread-safe.
    One pool sized to the worker's threads keeps one kept-alive connection
    per concurrent call; a Session per thread would open threads x
    providers connections and lose reuse whenever gthread hands a request
    to another thread.
    """

    def __init__(self, provider, base_url, *, headers=None, connect_timeout,
                 read_timeout, pool_size, cooldown=15.0):
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.cooldown = cooldown
        self.session = requests.Session()
        self.session.trust_env = False
        # The body is read raw (read1), so ask for it uncompressed.
        self.session.headers["Accept-Encoding"] = "identity"
        self.session.headers.update(headers or {})
        adapter = _WatchedAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._adapter = adapter
        self._headers = dict(self.session.headers)

    def close(self):
        self.session.close()

    def _send(self, method, path, body, *, read_timeout, params=None):
        # The session's adapter is called directly with a request prepared
        # here: Session.request would merge settings, proxies and cookies on
        # every call (a tenth of the gateway's CPU in the benchmark's
        # profile) for features an upstream API call does not use, and
        # would follow redirects, which we must not.
        try:
            prepared = requests.PreparedRequest()
            prepared.prepare(method=method, url=self.base_url + path, headers=self._headers,
                             json=body, params=params)
            return self._adapter.send(prepared, stream=True, verify=True, cert=None,
                                      proxies={},
                                      timeout=(self.connect_timeout, read_timeout))
        except (requests.RequestException, Urllib3Error, OSError, RecursionError) as exc:
            raise self._send_error(exc, read_timeout) from None

    def _send_error(self, exc, read_timeout):
        """Return our error for an exception raised while sending and awaiting headers."""
        if isinstance(exc, (requests.exceptions.InvalidJSONError, requests.exceptions.InvalidURL,
                            requests.exceptions.InvalidHeader, RecursionError)):
            # Our own request could not be built: the caller's input or a bug,
            # never evidence about the provider's health.
            return errors.InvalidRequest(f"{self.provider}: request could not be sent "
                                         f"({type(exc).__name__})")
        aborted = aborted_error(self.provider)
        if aborted is not None:
            return aborted
        if isinstance(exc, requests.ConnectTimeout):
            return errors.UpstreamUnavailable(
                f"{self.provider}: connect timeout after {self.connect_timeout:g}s",
                reason="ConnectTimeout")
        if isinstance(exc, requests.ReadTimeout):
            return errors.UpstreamUnavailable(
                f"{self.provider}: no answer within {read_timeout:g}s", reason="ReadTimeout")
        if isinstance(exc, (requests.ConnectionError, Urllib3Error, OSError)):
            return errors.UpstreamUnavailable(
                f"{self.provider}: connection failed ({type(exc).__name__})",
                reason="ConnectionError")
        return errors.UpstreamError(f"{self.provider}: {type(exc).__name__}",
                                    reason="RequestError")

    def _read_body(self, response, deadline):
        """Read the whole body, the read timeout bounding all of it."""
        raw = response.raw
        sock = _socket_of(raw)
        parts = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                if sock is not None:
                    sock.settimeout(remaining)
                data = raw.read1(_READ_SIZE)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        except (socket.timeout, ReadTimeoutError, requests.ReadTimeout):
            raise errors.UpstreamUnavailable(
                f"{self.provider}: response not complete within the read timeout",
                reason="ReadTimeout") from None
        except (Urllib3Error, requests.RequestException, OSError):
            raise aborted_error(self.provider) or errors.UpstreamError(
                f"{self.provider}: connection closed early", reason="closed-early") from None
        finally:
            response.close()

    def request_json(self, method, path, body=None, *, model="", read_timeout=None,
                     params=None):
        """Send a request and return the decoded JSON answer, or raise our error."""
        read_timeout = read_timeout or self.read_timeout
        deadline = time.monotonic() + read_timeout
        call = current_call()
        if call is not None:
            call.deadline = deadline  # enforced from outside while headers trickle in
        response = self._send(method, path, body, read_timeout=read_timeout,
                              params=params)
        raw = self._read_body(response, deadline)
        if response.status_code >= 400:
            raise error_from_status(response.status_code, raw, response.headers,
                                    provider=self.provider, model=model,
                                    cooldown=self.cooldown)
        if 300 <= response.status_code < 400:
            raise errors.UpstreamError(
                f"{self.provider}: unexpected redirect ({response.status_code})",
                reason=f"HTTP {response.status_code}")
        try:
            return json.loads(raw)
        except ValueError:
            raise errors.UpstreamError(f"{self.provider}/{model}: malformed JSON answer",
                                       reason="malformed-response") from None

    def probe(self, path, timeout):
        """Raise an UpstreamError unless ``path`` answers below 500 within ``timeout``."""
        started = time.monotonic()
        response = self._send("GET", path, None, read_timeout=timeout)
        self._read_body(response, started + timeout)
        if response.status_code >= 500:
            raise errors.UpstreamError(f"{self.provider}: probe got HTTP "
                                       f"{response.status_code}",
                                       reason=f"HTTP {response.status_code}")

    def open_stream(self, path, body, *, model, idle_timeout, params=None):
        """Start a streamed request; return an ``UpstreamStream`` once headers are in."""
        response = self._send("POST", path, body, read_timeout=idle_timeout,
                              params=params)
        if response.status_code >= 300:
            raw = self._read_body(response, time.monotonic() + idle_timeout)
            if response.status_code < 400:
                raise errors.UpstreamError(f"{self.provider}: unexpected redirect",
                                           reason=f"HTTP {response.status_code}")
            raise error_from_status(response.status_code, raw, response.headers,
                                    provider=self.provider, model=model,
                                    cooldown=self.cooldown)
        return UpstreamStream(self.provider, response, idle_timeout)


class _WatchedAdapter(HTTPAdapter):
    """An adapter whose connections tell the call in flight their socket."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = POOL_CLASSES


class UpstreamStream:
    """Lines of a streamed upstream answer; errors become ours, close() closes."""

    def __init__(self, provider, response, idle_timeout):
        self.provider = provider
        self.response = response
        self.idle_timeout = idle_timeout
        #: Set by the provider once the upstream sent its last event.
        self.finished = False

    def lines(self):
        """Yield the body's lines (bytes, without line endings) as they arrive."""
        raw = self.response.raw
        pending = b""
        try:
            while True:
                data = raw.read1(_READ_SIZE)
                if not data:
                    break
                pending += data
                if b"\n" not in data:
                    continue
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r")
        except (socket.timeout, ReadTimeoutError, requests.ReadTimeout):
            raise errors.UpstreamUnavailable(
                f"{self.provider}: stream idle for more than {self.idle_timeout:g}s",
                reason="StreamIdleTimeout") from None
        except (Urllib3Error, requests.RequestException, OSError):
            raise aborted_error(self.provider) or errors.UpstreamError(
                f"{self.provider}: stream closed early", reason="closed-early") from None
        if pending.strip():
            yield pending.rstrip(b"\r")

    def close(self):
        """Close the stream; a finished one first reads its last bytes so the
        kept-alive connection goes back to the pool instead of being dropped."""
        if self.finished:
            self._drain()
        self.response.close()

    def _drain(self):
        # The upstream has sent [DONE] (or done: true); what remains is the
        # chunked terminator. Reading it to EOF releases the connection.
        raw = self.response.raw
        sock = _socket_of(raw)
        try:
            if sock is not None:
                sock.settimeout(_DRAIN_TIMEOUT)
            for _ in range(16):
                if not raw.read1(_READ_SIZE):
                    return
        except Exception:  # a failed drain only costs the connection
            return


def aborted_error(provider):
    """Return the error for this thread's call if it was aborted from outside (inflight.py)."""
    call = current_call()
    if call is None or call.aborted is None:
        return None
    if call.aborted == "ReadTimeout":
        return errors.UpstreamUnavailable(
            f"{provider}: response not complete within the read timeout", reason="ReadTimeout")
    return errors.UpstreamUnavailable(f"{provider}: call abandoned ({call.aborted})",
                                      reason=call.aborted)


def _socket_of(raw):
    """Return the socket under a urllib3 response, if it can be reached."""
    conn = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    return getattr(conn, "sock", None)


def check_stream_event(event, label):
    """Raise for a stream event that is not an object or that reports an upstream error."""
    if not isinstance(event, dict):
        raise errors.UpstreamError(f"{label}: malformed stream event",
                                   reason="malformed-response")
    if event.get("error") is not None:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise errors.UpstreamError(f"{label}: error in stream: {message}",
                                   reason="stream-error")


def sse_data(lines):
    """Yield the decoded JSON of each ``data:`` event; stop at ``[DONE]``."""
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        if not payload:
            continue
        try:
            yield json.loads(payload)
        except ValueError:
            raise errors.UpstreamError("malformed event in upstream stream",
                                       reason="malformed-response") from None
