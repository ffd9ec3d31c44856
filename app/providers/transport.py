"""The one HTTP client: a provider's kept-alive upstream connections, on urllib3.

``Transport`` keeps a small stack of urllib3 ``HTTPConnection``s per
provider (as many as the worker has threads), sends one request per
checkout and gives the connection back once its answer was read to the
end. It uses urllib3's connection class directly rather than a
``PoolManager``: an upstream call must be abortable while it waits for
headers (see ``inflight.py``), which needs the socket before the answer
arrives, and a connection we check out ourselves gives it without
reaching into the library. Every failure of urllib3, ``http.client`` or
the socket becomes one of our errors in ``failure`` and nowhere else.

What it keeps: no retries, no redirects followed (a 3xx is an answer the
provider classifies), no proxies from the environment, identity encoding
(bodies are relayed as read), a connect timeout on every connect, and a
read timeout that bounds a whole answer (headers included) for calls
that are not streamed, or each read of a stream.
"""

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import parse_url

from app import errors

READ_SIZE = 65536
DRAIN_TIMEOUT = 0.25
# What a failed exchange can raise below us: urllib3's tree, http.client's
# (urllib3's connection is an http.client connection) and the socket's.
TRANSPORT_ERRORS = (Urllib3Error, http.client.HTTPException, OSError)

try:  # requests' CA bundle when present, as the gateway used before; else the system's
    import certifi
    CA_CERTS = certifi.where()
except ImportError:  # pragma: no cover
    CA_CERTS = None


def socket_of(conn):
    """Return the socket of a connected urllib3 connection (None when not connected).

    The one place the transport relies on an attribute that urllib3 does
    not document: ``sock``, inherited from ``http.client.HTTPConnection``.
    tests/test_transport.py fails loudly if a release renames it.
    """
    return conn.sock


@dataclass
class Reply:
    """A whole upstream answer."""

    status: int
    headers: object     # case-insensitive mapping
    body: bytearray     # as read (bytes-like: json.loads and decode take it)


@dataclass
class _Exchange:
    """One request on a checked-out connection, and the call waiting on it."""

    conn: object
    sock: object
    response: object
    call: object


class Transport:
    """One provider's connections, timeouts and the translation of their failures."""

    def __init__(self, provider, base_url, *, headers=None, connect_timeout,
                 read_timeout, pool_size, max_answer_bytes=32 * 1024 * 1024):
        url = parse_url(base_url)
        self.provider = provider
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_answer_bytes = max_answer_bytes
        self._https = url.scheme == "https"
        self._host = url.host
        self._port = url.port or (443 if self._https else 80)
        self._prefix = (url.path or "").rstrip("/")
        self._headers = {"Accept-Encoding": "identity", "Content-Type": "application/json",
                         "User-Agent": "mana-llm", **(headers or {})}
        self._pool_size = pool_size
        self._idle = []
        self._lock = threading.Lock()

    def close(self):
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- connections ------------------------------------------------------------------

    def _new_conn(self):
        if self._https:
            return HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                   ca_certs=CA_CERTS)
        return HTTPConnection(self._host, self._port, timeout=self.connect_timeout)

    def _checkout(self):
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._new_conn()
        if socket_of(conn) is not None and not conn.is_connected:
            conn.close()  # the upstream closed it while it was idle; connect again
        return conn

    def _checkin(self, exchange, reusable):
        """End an exchange: the call lets the socket go, the connection goes back or closes."""
        if exchange.call is not None:
            exchange.call.detach()
        if exchange.response is not None:
            exchange.response.close()
        if not reusable:
            exchange.conn.close()
        with self._lock:
            if len(self._idle) < self._pool_size:
                self._idle.append(exchange.conn)
                return
        exchange.conn.close()

    def _send(self, method, path, data, *, call, timeout, params):
        """Send a request and wait for the answer's headers; return the exchange."""
        conn = self._checkout()
        exchange = _Exchange(conn, None, None, call)
        url = self._prefix + path + ("?" + urlencode(params) if params else "")
        try:
            if socket_of(conn) is None:
                conn.timeout = self.connect_timeout
                conn.connect()
            exchange.sock = socket_of(conn)
            if call is not None:
                call.attach(exchange.sock)
            conn.timeout = timeout
            conn.request(method, url, body=data, headers=self._headers,
                         preload_content=False, decode_content=False)
            exchange.response = conn.getresponse()
        except TRANSPORT_ERRORS as exc:
            self._checkin(exchange, reusable=False)
            raise self.failure(exc, call, "send", timeout) from None
        return exchange

    # -- whole answers and streams ----------------------------------------------------

    def fetch(self, method, path, data=None, *, call=None, timeout=None, params=None):
        """Send a request and return the whole ``Reply``; ``timeout`` bounds all of it."""
        timeout = timeout or self.read_timeout
        deadline = time.monotonic() + timeout
        if call is not None:
            call.deadline = deadline  # enforced from outside while headers trickle in
        exchange = self._send(method, path, data, call=call, timeout=timeout, params=params)
        body = self._read_all(exchange, deadline, timeout)
        return Reply(exchange.response.status, exchange.response.headers, body)

    def _read_all(self, exchange, deadline, timeout):
        # One buffer grown in place: a list of parts joined at the end held
        # every answer twice at its peak (64 MiB for one at the size limit).
        body, complete = bytearray(), False
        try:
            while len(body) <= self.max_answer_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                exchange.sock.settimeout(remaining)
                data = exchange.response.read1(READ_SIZE)
                if not data:
                    complete = not _aborted(exchange.call)
                    break
                body += data
        except TRANSPORT_ERRORS as exc:
            self._checkin(exchange, reusable=False)
            raise self.failure(exc, exchange.call, "body", timeout) from None
        self._checkin(exchange, reusable=complete and _framed(exchange.response.status))
        if _aborted(exchange.call):
            raise aborted_error(self.provider, exchange.call.aborted)
        if not complete:
            raise errors.UpstreamError(
                f"{self.provider}: answer larger than {self.max_answer_bytes} bytes",
                reason="too-large")
        return body

    def open_stream(self, path, data, *, call=None, idle_timeout, params=None):
        """Start a streamed request: an ``UpstreamStream`` on 2xx, else the whole ``Reply``.

        The read timeout bounds the wait for the stream's first content: the
        call's deadline is enforced while the walk is priming the stream
        and no longer once the walk has committed to it (the call ends).
        """
        if call is not None:
            call.deadline = time.monotonic() + self.read_timeout
        exchange = self._send("POST", path, data, call=call, timeout=idle_timeout,
                              params=params)
        status = exchange.response.status
        if 200 <= status < 300:
            return UpstreamStream(self, exchange, idle_timeout)
        body = self._read_all(exchange, time.monotonic() + idle_timeout, idle_timeout)
        return Reply(status, exchange.response.headers, body)

    # -- failures -----------------------------------------------------------------------

    def failure(self, exc, call, stage, timeout):
        """Return our error for a failure below us (the one place they are translated)."""
        if call is not None and call.aborted is not None:
            return aborted_error(self.provider, call.aborted)
        name = self.provider
        if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: a subclass
            return errors.UpstreamUnavailable(
                f"{name}: connection failed ({type(exc).__name__})", reason="ConnectionError")
        if isinstance(exc, ConnectTimeoutError):
            return errors.UpstreamUnavailable(
                f"{name}: connect timeout after {self.connect_timeout:g}s",
                reason="ConnectTimeout")
        if isinstance(exc, (socket.timeout, ReadTimeoutError)):
            if stage == "stream":
                return errors.UpstreamUnavailable(
                    f"{name}: stream idle for more than {timeout:g}s",
                    reason="StreamIdleTimeout")
            if stage == "body":
                return errors.UpstreamUnavailable(
                    f"{name}: response not complete within the read timeout",
                    reason="ReadTimeout")
            return errors.UpstreamUnavailable(f"{name}: no answer within {timeout:g}s",
                                              reason="ReadTimeout")
        if stage == "send":
            return errors.UpstreamUnavailable(
                f"{name}: connection failed ({type(exc).__name__})", reason="ConnectionError")
        return errors.UpstreamError(f"{name}: {'stream' if stage == 'stream' else 'connection'}"
                                    " closed early", reason="closed-early")


def _framed(status):
    """Tell whether an answer's status lets its body say where it ends.

    http.client takes a 1xx other than 100, a 204 or a 304 as a whole
    answer without a body; whatever the upstream sends after it (its real
    answer, late) would be read by the next call on the connection as that
    call's answer, so one caller would get another's. Never reuse those.
    """
    return status >= 200 and status not in (204, 304)


def _aborted(call):
    return call is not None and call.aborted is not None


def aborted_error(provider, reason):
    """Return the error for a call aborted from outside (inflight.py)."""
    if reason == errors.CallerLeft.reason:
        return errors.CallerLeft(f"{provider}: call abandoned, the caller left")
    if reason == "ReadTimeout":
        return errors.UpstreamUnavailable(
            f"{provider}: response not complete within the read timeout", reason="ReadTimeout")
    return errors.UpstreamUnavailable(f"{provider}: call abandoned ({reason})", reason=reason)


class UpstreamStream:
    """The body of a streamed answer as it arrives; ``close()`` ends the exchange."""

    def __init__(self, transport, exchange, idle_timeout):
        self._transport = transport
        self._exchange = exchange
        self.idle_timeout = idle_timeout
        self.status = exchange.response.status
        #: Set by the provider once the upstream sent its last event.
        self.finished = False
        self._closed = False

    def chunks(self):
        """Yield the body's bytes as they arrive; failures become our errors."""
        response, call = self._exchange.response, self._exchange.call
        try:
            while True:
                data = response.read1(READ_SIZE)
                if not data:
                    break
                yield data
        except TRANSPORT_ERRORS as exc:
            raise self._transport.failure(exc, call, "stream", self.idle_timeout) from None
        if _aborted(call):  # a shut-down socket reads as the end of the body
            raise aborted_error(self._transport.provider, call.aborted)

    def close(self):
        """End the stream; a finished one first reads its last bytes so the
        kept-alive connection goes back to the pool instead of being dropped."""
        if self._closed:
            return
        self._closed = True
        self._transport._checkin(self._exchange, reusable=self.finished and self._drain())

    def _drain(self):
        # The upstream has sent [DONE] (or done: true); what remains is the
        # chunked terminator. Reading it to EOF makes the connection reusable.
        try:
            self._exchange.sock.settimeout(DRAIN_TIMEOUT)
            for _ in range(16):
                if not self._exchange.response.read1(READ_SIZE):
                    return True
        except TRANSPORT_ERRORS:
            pass  # a failed drain only costs the connection
        return False
