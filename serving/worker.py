"""A gthread worker that slow clients cannot hold, and that lets go of its port when told to stop.

gunicorn's gthread worker gives a connection a thread as soon as its
first byte arrives, and the thread then blocks in the parser with no
deadline: a client trickling its head a byte a second holds a thread for
ever, and a few dozen such clients stop every other caller. Here the
worker's own loop reads the head without a thread (like nginx), so any
number of slow heads costs only a socket each, and:

* a head that is not complete ``header_timeout`` seconds after the
  connection was accepted (or, on a kept-alive connection, after the
  next request began) is closed;
* a body read that waits ``body_timeout`` seconds for a byte ends the
  request (the client is disconnected);
* a response write that waits ``send_timeout`` seconds for a client
  that stopped reading ends the request and resets the connection.

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

from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers import gthread

# A head this large is handed to the parser, which enforces gunicorn's
# own limits on it, without waiting for its end.
HEAD_LIMIT = 64 * 1024
HEAD_READ = 16 * 1024


class ClientTooSlow(NoMoreData):
    """The client did not send in time; gunicorn and Werkzeug treat it as a disconnect."""

    def __str__(self):
        return "client too slow"


def head_ready(head, start):
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


class DeadlineReader(SocketUnreader):
    """Read a connection with a deadline for the whole head and a bound on each body read."""

    def __init__(self, sock, clock):
        super().__init__(sock)
        self.clock = clock
        self.deadline = None  # absolute: the head (or a drain) must be in by then
        self.idle = None  # seconds one read may wait for a byte
        self.write_timeout = None  # what the socket's timeout is between reads
        self.expired = False

    def chunk(self, size_hint=None):
        timeout = self.idle
        if self.deadline is not None:
            left = self.deadline - self.clock()
            if left <= 0:
                self.expired = True
                raise ClientTooSlow()
            timeout = left if timeout is None else min(timeout, left)
        self.sock.settimeout(timeout)
        try:
            return super().chunk(size_hint)
        except socket.timeout:
            self.expired = True
            raise ClientTooSlow() from None
        finally:
            self.sock.settimeout(self.write_timeout)

    def feed(self, data):
        """Append bytes read from the socket elsewhere, after anything buffered."""
        self.buf.seek(0, 2)
        self.buf.write(data)


class TimedConn(gthread.TConn):
    """A connection that collects its head in the worker's loop before it gets a thread."""

    def __init__(self, cfg, sock, client, server, clock):
        super().__init__(cfg, sock, client, server)
        self.clock = clock
        self.head = bytearray()
        self.head_deadline = None
        self.reader = None
        # The head is read before a thread is given: never wait for data in one.
        self.data_ready = True

    @property
    def expired(self):
        return self.reader is not None and self.reader.expired

    def init(self):
        super().init()
        if self.reader is None and not self.is_http2:
            self.reader = DeadlineReader(self.sock, self.clock)
            self.reader.buf = self.parser.unreader.buf
            self.parser.unreader = self.reader

    def begin_request(self, header_timeout):
        """Give the parser the head read so far, with the time left to finish it."""
        self.reader.feed(bytes(self.head))
        self.head = bytearray()
        self.reader.deadline = self.head_deadline or self.clock() + header_timeout
        self.reader.idle = None
        self.head_deadline = None

    def reset(self):
        """Close at once with a reset: nothing more is owed to this client."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


class TimedThreadWorker(gthread.ThreadWorker):
    """gthread with header, body and send timeouts and a prompt close of the listeners."""

    header_timeout = 10.0
    body_timeout = 30.0
    send_timeout = 60.0
    clock = staticmethod(time.monotonic)

    def configure_timeouts(self, header, body, send):
        """Set the three client timeouts, in seconds (gunicorn.conf.py calls this)."""
        self.header_timeout, self.body_timeout, self.send_timeout = header, body, send

    # -- the worker's loop (main thread) ---------------------------------------------------

    def accept(self, listener):
        """Accept one connection and start collecting its head; return False if none waited."""
        try:
            sock, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return False
            raise
        self.nr_conns += 1
        conn = TimedConn(self.cfg, sock, address, listener.getsockname(), self.clock)
        self.await_head(conn)
        return True

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection starts its next request: collect that head."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.await_head(conn)

    def await_head(self, conn):
        """Wait in the poller, without a thread, until the head is in or its time is up."""
        # Every entry gets the same timeout, so the deque stays sorted for murder_pending.
        conn.timeout = conn.head_deadline = self.clock() + self.header_timeout
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_head_readable, conn))
        self.on_head_readable(conn, conn.sock)

    def on_head_readable(self, conn, client):
        """Take what the client sent; hand the connection to a thread once its head is in."""
        start = len(conn.head)
        try:
            data = conn.sock.recv(HEAD_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.head += data
        if data and not head_ready(conn.head, start):
            return
        self.poller.unregister(client)
        self.pending_conns.remove(conn)
        if not data:  # the client left before finishing its head
            self.nr_conns -= 1
            conn.close()
            return
        self.enqueue_req(conn)

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

    def finish_request(self, conn, fs):
        if conn.expired:
            self.nr_conns -= 1
            conn.reset()
            return
        super().finish_request(conn, fs)

    # -- request threads -------------------------------------------------------------------

    def handle(self, conn):
        try:
            conn.sock.setblocking(True)
            conn.init()
        except OSError:
            return False
        if conn.reader is not None:
            conn.begin_request(self.header_timeout)
        return super().handle(conn)

    def handle_request(self, req, conn):
        reader = conn.reader
        if reader is not None:
            reader.deadline, reader.idle = None, self.body_timeout
            reader.write_timeout = self.send_timeout
            conn.sock.settimeout(self.send_timeout)
        try:
            return super().handle_request(req, conn)
        except socket.timeout:
            # A write waited send_timeout for a client that stopped reading.
            self.log.info("closing a client that stopped reading for %ss: %s",
                          self.send_timeout, conn.client)
            if reader is not None:
                reader.expired = True
            return False

    def _keepalive_after(self, conn, keepalive):
        if conn.reader is not None:
            # gunicorn bounds this drain of an unread body; make the reader keep that bound.
            conn.reader.deadline = self.clock() + gthread.DEFAULT_WORKER_DATA_TIMEOUT
        return super()._keepalive_after(conn, keepalive)
