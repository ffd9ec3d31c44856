"""Upstream calls in flight: their sockets, their deadlines, and aborting them.

A thread blocked in ``recv`` on an upstream socket cannot be interrupted
by a timeout it set long ago, so two things are enforced from outside,
by the prober's tick, through the socket of the call:

- the read timeout of a call that is not streamed bounds the whole
  response, headers included (an upstream that trickles a header line a
  second cannot hold a thread for hours);
- when a provider trips, the calls still waiting on it are aborted, so
  their callers move on to the next entry of their chain at once instead
  of each waiting out its read timeout.

Aborting shuts the socket down; the blocked read returns, and the
transport reports the call with the reason it was aborted for.
"""

import socket
import threading
import time

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()
# Which call owns each socket right now. A pooled connection outlives the
# call that used it, so an abort only touches a socket its call still owns.
_owners = {}
_owners_lock = threading.Lock()


class Call:
    """One call waiting on an upstream."""

    __slots__ = ("provider", "started", "deadline", "aborted", "sock")

    def __init__(self, provider, started):
        self.provider = provider
        self.started = started
        self.deadline = None     # monotonic; set by the transport for whole-answer calls
        self.aborted = None      # the reason, once aborted
        self.sock = None

    def abort(self, reason):
        """Shut the call's socket down (if it still owns one) so its read returns."""
        with _owners_lock:
            if self.aborted is None:
                self.aborted = reason
            sock = self.sock
            if sock is None or _owners.get(sock) is not self:
                return
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class InFlight:
    """The upstream calls a worker's threads are waiting on, by provider."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._calls = {}

    def begin(self, provider):
        """Register a call made by this thread; return it."""
        call = Call(provider, self._clock())
        with self._lock:
            self._calls.setdefault(provider, set()).add(call)
        _current.call = call
        return call

    def end(self, call):
        """Forget a call: from now on nothing can abort its (pooled) socket."""
        with self._lock:
            self._calls.get(call.provider, set()).discard(call)
        with _owners_lock:
            if call.sock is not None and _owners.get(call.sock) is call:
                del _owners[call.sock]
        if getattr(_current, "call", None) is call:
            _current.call = None

    def started_times(self, provider):
        with self._lock:
            return [c.started for c in self._calls.get(provider, ())]

    def abort_provider(self, provider, reason):
        """Abort every call waiting on ``provider``."""
        with self._lock:
            calls = list(self._calls.get(provider, ()))
        for call in calls:
            call.abort(reason)

    def enforce_deadlines(self):
        """Abort the calls whose whole-answer deadline has passed."""
        now = self._clock()
        with self._lock:
            late = [c for calls in self._calls.values() for c in calls
                    if c.deadline is not None and now > c.deadline]
        for call in late:
            call.abort("ReadTimeout")


def current_call():
    """Return the call this thread is making, if the router registered one."""
    return getattr(_current, "call", None)


def _attach(sock):
    call = current_call()
    if call is None or sock is None:
        return
    with _owners_lock:
        if call.sock is not None and _owners.get(call.sock) is call:
            del _owners[call.sock]  # a call that sends again owns only its latest socket
        call.sock = sock
        _owners[sock] = call
    if call.aborted is not None:
        call.abort(call.aborted)


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self, *args, **kwargs):
        _attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args, **kwargs):
        _attach(self.sock)
        return super().getresponse(*args, **kwargs)


def _release(conn):
    """A connection goes back to the pool: no call owns its socket any more."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    with _owners_lock:
        call = _owners.pop(sock, None)
        if call is not None and call.sock is sock:
            call.sock = None


class _ReleasingPool:
    def _put_conn(self, conn):
        _release(conn)
        super()._put_conn(conn)


class _WatchedHTTPPool(_ReleasingPool, HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(_ReleasingPool, HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


POOL_CLASSES = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
