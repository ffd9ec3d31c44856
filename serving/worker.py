"""A gthread worker that slow clients cannot hold, and that lets go of its port when told to stop.

gunicorn's gthread worker gives a connection a thread as soon as its
first byte arrives, and the thread then blocks in the parser with no
deadline: a client trickling its head a byte a second holds a thread for
ever, and a few dozen such clients stop every other caller. Here:

* a thread only ever takes the bytes that already arrived; until the
  head is complete the connection waits in the worker's poller, costing
  a socket, not a thread, and is closed if the head is not complete
  ``header_timeout`` seconds after it began (the connection was
  accepted, or a kept-alive connection became readable again);
* a body read that waits ``body_timeout`` seconds for a byte fails
  (the kernel's SO_RCVTIMEO), which ends the request;
* a response write that waits ``send_timeout`` seconds for a client
  that stopped reading (SO_SNDTIMEO) ends the request and resets the
  connection;
* a connection the worker closes lingers for up to 2 s (so the last
  bytes of the answer arrive before a reset could destroy them) in the
  poller, not in the worker's loop, which gthread blocks for those 2 s
  per client that does not close its end: 20 such clients stalled every
  caller for 18 s.

Kernel timeouts cost nothing per read or write, unlike Python socket
timeouts (a poll() before every call).

On SIGTERM (and HUP, or ``max_requests``) the worker closes its copies
of the listening sockets as soon as it stops accepting: with the
master's copies closed too, new connections are refused at once instead
of queueing unanswered for the whole drain.
"""

import errno
import selectors
import socket
import struct
import time
from functools import partial

from gunicorn import util
from gunicorn.workers import gthread

# A head this large is handed to the parser, which enforces gunicorn's
# own limits on it, without waiting for its end.
HEAD_LIMIT = 64 * 1024
HEAD_READ = 16 * 1024
SWEEP_INTERVAL = 0.25  # how often waiting heads are checked against their deadlines
LINGER = 2.0  # gunicorn's graceful close: wait this long for the client's end...
LINGER_DRAIN = 64 * 1024  # ...reading at most this much of what it still sends


def head_ready(head, start=0):
    """Return True once ``head`` holds a whole head, or enough for the parser to reject it."""
    if len(head) >= HEAD_LIMIT or head.find(b"\r\n\r\n", max(0, start - 3)) >= 0:
        return True
    # A bare LF is a request the parser rejects at once: let it.
    index = head.find(b"\n", start)
    while index >= 0:
        if index == 0 or head[index - 1] != 0x0D:
            return True
        index = head.find(b"\n", index + 1)
    return False


def timeval(seconds):
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


class TimedConn(gthread.TConn):
    """A connection that collects its head before the parser sees it."""

    def __init__(self, cfg, sock, client, server):
        super().__init__(cfg, sock, client, server)
        self.head = bytearray()
        self.head_deadline = None
        self.stalled = False  # a write waited send_timeout: reset, owe nothing
        self.closed = False
        self.half_closed = False
        self.head_pending = False  # a thread found the head incomplete: back to the poller
        self.drained = 0
        self.timeouts_set = False
        # Threads never wait for data: they take what arrived (collect_head).
        self.data_ready = True

    def collect_head(self, clock, header_timeout):
        """Take the bytes that arrived, without waiting; return True once the head is in."""
        if self.head_deadline is None:
            self.head_deadline = clock() + header_timeout
        elif clock() >= self.head_deadline:
            raise TimeoutError("request head not complete in time")
        # Bytes read ahead with the last request come first.
        if self.parser is not None and self.parser.unreader.buf.seek(0, 2):
            self.head[:0] = self.parser.unreader.take_buffered()
        if not head_ready(self.head):
            try:
                data = self.sock.recv(HEAD_READ, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "client left mid-head")
            self.head += data
            if not head_ready(self.head, len(self.head) - len(data)):
                return False
        self.init()
        self.parser.unreader.unread(bytes(self.head))
        self.head.clear()
        self.head_deadline = None
        return True

    def set_kernel_timeouts(self, receive, send):
        """Bound each blocking read and write of this socket in the kernel (once)."""
        if not self.timeouts_set:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(receive))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send))
            self.timeouts_set = True

    def body_failed(self):
        """Return True if reading the last request's body failed (timeout, bad chunk)."""
        body = getattr(getattr(self.parser, "mesg", None), "body", None)
        return getattr(body, "failed", False) is True

    def half_close(self):
        """Send our end (FIN) after the answer; the worker's loop waits for the client's."""
        self.sock.shutdown(socket.SHUT_WR)
        self.half_closed = True

    def reset(self):
        """Close at once with a reset: nothing more is owed to this client."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        util.close(self.sock)


class TimedThreadWorker(gthread.ThreadWorker):
    """gthread with header, body and send timeouts and a prompt close of the listeners."""

    header_timeout = 10.0
    body_timeout = 30.0
    send_timeout = 60.0
    clock = staticmethod(time.monotonic)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_sweep = 0.0
        self.lingering = []  # half-closed connections waiting for the client's end

    def configure_timeouts(self, header, body, send):
        """Set the three client timeouts, in seconds (gunicorn.conf.py calls this)."""
        self.header_timeout, self.body_timeout, self.send_timeout = header, body, send

    # -- the worker's loop (main thread) ---------------------------------------------------

    def accept(self, listener):
        """Accept one connection and give it to a thread; return False if none waited."""
        try:
            sock, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return False
            raise
        self.nr_conns += 1
        self.enqueue_req(TimedConn(self.cfg, sock, address, listener.getsockname()))
        return True

    def finish_request(self, conn, fs):
        # The request thread left its verdict on the connection.
        if conn.closed:
            self.nr_conns -= 1
        elif conn.stalled:
            self.nr_conns -= 1
            conn.reset()
        elif conn.half_closed:
            self.linger(conn)
        elif conn.head_pending:
            conn.head_pending = False
            self.await_head(conn)
        else:
            super().finish_request(conn, fs)

    def await_head(self, conn):
        """Park a connection in the poller, without a thread, until more of its head arrives."""
        conn.sock.setblocking(False)
        conn.timeout = conn.head_deadline
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_pending_socket_readable, conn))

    def linger(self, conn):
        """Wait in the poller for a half-closed client to close its end, for LINGER s at most."""
        conn.sock.setblocking(False)
        conn.timeout = self.clock() + LINGER
        self.lingering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_linger_readable, conn))

    def on_linger_readable(self, conn, client):
        try:
            data = conn.sock.recv(HEAD_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if data and conn.drained < LINGER_DRAIN:
            return
        self.end_linger(conn)

    def end_linger(self, conn):
        self.lingering.remove(conn)
        self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        util.close(conn.sock)

    def wait_for_and_dispatch_events(self, timeout):
        # Wake up often enough to close late heads on time, not only when
        # something happens.
        if self.pending_conns or self.lingering:
            timeout = min(timeout, SWEEP_INTERVAL)
        super().wait_for_and_dispatch_events(timeout)

    def murder_pending(self):
        """Close connections whose head is late, or whose linger is over."""
        # The deque is not sorted by deadline here: a head goes back to it
        # each time more of it arrives.
        now = self.clock()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_INTERVAL
        for conn in [c for c in self.pending_conns if c.timeout <= now]:
            self.pending_conns.remove(conn)
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            util.close(conn.sock)
        for conn in [c for c in self.lingering if c.timeout <= now]:
            self.end_linger(conn)

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            self.close_listeners()

    def close_listeners(self):
        """Take what already queued on the listeners, then close this process's copies."""
        for listener in self.sockets:
            if getattr(listener, "sock", True) is None:
                continue  # already closed
            room = max(0, self.worker_connections - self.nr_conns)
            while room and self.accept(listener):
                room -= 1
            listener.close()

    # -- request threads -------------------------------------------------------------------

    def handle(self, conn):
        try:
            if not conn.collect_head(self.clock, self.header_timeout):
                conn.head_pending = True
                return False
            conn.set_kernel_timeouts(self.body_timeout, self.send_timeout)
        except OSError:
            self.close_now(conn)
            return False
        keep = super().handle(conn)
        if not keep and not conn.stalled:
            try:
                if conn.body_failed():
                    raise ConnectionAbortedError("the request body was not read whole")
                conn.half_close()
            except OSError:
                self.close_now(conn)
        return keep

    def close_now(self, conn):
        """Close without lingering: the client is gone, or its request was not read whole."""
        util.close(conn.sock)
        conn.closed = True

    def handle_request(self, req, conn):
        try:
            return super().handle_request(req, conn)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            # A write waited send_timeout for a client that stopped reading.
            self.log.info("closing a client that stopped reading for %ss: %s",
                          self.send_timeout, conn.client)
            conn.stalled = True
            return False
