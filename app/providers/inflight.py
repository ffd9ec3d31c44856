"""Upstream calls in flight: their sockets, their deadlines, and aborting them.

A thread blocked in ``recv`` on an upstream socket cannot be interrupted
by a timeout it set long ago, so two things are enforced from outside,
by the prober's tick, through the socket of the call:

- the read timeout of a call that is not streamed bounds the whole
  response, headers included (an upstream that trickles a header line a
  second cannot hold a thread for hours);
- when a provider trips, the calls still waiting on it are aborted, so
  their callers move on to the next entry of their chain at once instead
  of each waiting out its read timeout;
- when the caller of a committed stream has gone while its upstream is
  silent, the stream's call is aborted, so the thread and the upstream's
  generation are freed now rather than when the upstream speaks again
  (the thread is blocked on the upstream and cannot see the caller go).

The walker registers a ``Call`` and passes it, as an argument, down to
the transport, which attaches the socket it waits on and detaches it
before the connection goes back to the pool. Aborting shuts the attached
socket down; the blocked read returns, and the transport reports the
call with the reason it was aborted for.
"""

import select
import socket
import threading
import time


class Call:
    """One call waiting on an upstream."""

    __slots__ = ("provider", "started", "deadline", "aborted", "_sock", "_lock")

    def __init__(self, provider, started):
        self.provider = provider
        self.started = started
        self.deadline = None     # monotonic; set by the transport for whole-answer calls
        self.aborted = None      # the reason, once aborted
        self._sock = None
        self._lock = threading.Lock()

    @property
    def attached(self):
        """Tell whether the call owns a socket right now."""
        return self._sock is not None

    def attach(self, sock):
        """Own ``sock`` from now on; shut it at once if the call was already aborted."""
        with self._lock:
            self._sock = sock
            if self.aborted is not None:
                _shut(sock)

    def detach(self):
        """Give the socket up (its connection goes back to the pool): no abort reaches it."""
        with self._lock:
            self._sock = None

    def abort(self, reason):
        """Shut the call's socket down (if it still owns one) so its read returns."""
        # Under the lock: a socket detached and pooled meanwhile is never touched.
        with self._lock:
            if self.aborted is None:
                self.aborted = reason
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock):
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
        self._watched = {}   # call of a committed stream -> its caller's socket

    def begin(self, provider):
        """Register a call to ``provider``; return it (pass it to the provider)."""
        call = Call(provider, self._clock())
        with self._lock:
            self._calls.setdefault(provider, set()).add(call)
        return call

    def end(self, call):
        """Forget a call: from now on nothing aborts it."""
        with self._lock:
            self._calls.get(call.provider, set()).discard(call)

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

    def watch(self, call, caller):
        """Abort ``call`` (a committed stream's) if the ``caller`` socket closes."""
        with self._lock:
            self._watched[call] = caller

    def unwatch(self, call):
        with self._lock:
            self._watched.pop(call, None)

    def abort_orphans(self):
        """Abort the watched calls whose caller has closed its connection."""
        with self._lock:
            watched = list(self._watched.items())
        for call, caller in watched:
            if caller_left(caller):
                call.abort("caller-left")


def caller_left(sock):
    """Tell whether the peer of ``sock`` closed it (readable, and at its end)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # Peeking leaves whatever the caller sent for the worker to read.
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed by the worker
        return True
