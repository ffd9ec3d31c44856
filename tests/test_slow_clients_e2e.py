"""Slow clients cannot hold the gateway's threads: heads, bodies and reads have deadlines.

The real gateway under gunicorn (2 workers x 16 threads), with short
timeouts set through the environment so the tests stay quick.
"""

import os
import socket
import time

import pytest
import requests

from tests.conftest import REPO, provider_env, wait_until

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2
BODY_TIMEOUT = 2
STREAM_IDLE_TIMEOUT = 2
SLOW_HEADS = 150  # with 2 x 16 threads, 32 blocked threads would stop everyone
HEAD = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Padding: " + b"p" * 64 + b"\r\n\r\n"
CHAT = {"model": "ollama/qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def slow_env(fake_factory):
    fake = fake_factory("ollama")
    env = provider_env({"ollama": fake})
    env.update({"ALIASES_PATH": os.path.join(REPO, "aliases.yaml"),
                "HEADER_TIMEOUT": str(HEADER_TIMEOUT), "BODY_TIMEOUT": str(BODY_TIMEOUT),
                "STREAM_IDLE_TIMEOUT": str(STREAM_IDLE_TIMEOUT)})
    return fake, env


def connect(port, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_peer(sock):
    """Return True if the server closed (or reset) the connection; never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Trickle:
    """Connections that each send one byte of a request head per tick."""

    def __init__(self, port, count, silent=0):
        self.started = time.monotonic()
        self.socks = [connect(port) for _ in range(count + silent)]
        self.talking = count
        self.closed_at = {}
        self.sent = 0

    def tick(self):
        """Send the next byte on every open talking connection; note which were closed."""
        for index, sock in enumerate(self.socks):
            if index in self.closed_at:
                continue
            try:
                if index < self.talking and self.sent < len(HEAD) - 1:  # never finish
                    sock.send(HEAD[self.sent:self.sent + 1])
                gone = closed_by_peer(sock)
            except OSError:
                gone = True
            if gone:
                self.closed_at[index] = time.monotonic() - self.started
        self.sent += 1

    def close(self):
        for sock in self.socks:
            sock.close()


def chat(url):
    """Return True if a plain chat request is answered normally within 5 s."""
    try:
        response = requests.post(url + "/v1/chat/completions", json=CHAT, timeout=5)
    except requests.RequestException:
        return False
    return response.status_code == 200 and "Hello from ollama" in response.text


def test_trickled_heads_hold_no_thread_and_are_closed(gateway_factory, slow_env):
    fake, env = slow_env
    gateway = gateway_factory(env)
    attack = Trickle(gateway.port, SLOW_HEADS, silent=10)
    answered = []
    try:
        for _ in range(HEADER_TIMEOUT + 8):  # bounded: one tick a second
            tick_started = time.monotonic()
            attack.tick()
            if len(attack.closed_at) == len(attack.socks):
                break
            answered.append(chat(gateway.url))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick_started)))
    finally:
        attack.close()
    times = sorted(attack.closed_at.values())
    print(f"{len(times)} of {len(attack.socks)} slow connections closed, after "
          f"{' to '.join(f'{t:.1f}' for t in times[:1] + times[-1:])} s; "
          f"caller requests answered during the attack: {answered}")
    assert answered and all(answered), "a normal caller was stopped by slow heads"
    assert len(times) == len(attack.socks), "slow connections were never closed"
    assert HEADER_TIMEOUT - 0.5 <= times[0] and times[-1] <= HEADER_TIMEOUT + 5
    assert chat(gateway.url), "the gateway did not recover after the attack"
    assert fake.hits("/api/chat") == len(answered) + 1


def test_stalled_body_is_disconnected(gateway_factory, slow_env):
    fake, env = slow_env
    gateway = gateway_factory(env)
    stalled = connect(gateway.port)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                    b'{"model": "ol')
    started = time.monotonic()
    try:
        assert chat(gateway.url), "a stalled body stopped a normal caller"
        assert wait_until(lambda: closed_by_peer(stalled), timeout=BODY_TIMEOUT + 8,
                          interval=0.1), "a stalled body was never disconnected"
        took = time.monotonic() - started
    finally:
        stalled.close()
    print(f"stalled body disconnected after {took:.1f} s")
    assert took >= BODY_TIMEOUT - 0.5
    assert chat(gateway.url)
    assert fake.hits("/api/chat") == 2  # the stalled request never went upstream


def test_client_that_stops_reading_a_stream_is_cut_off(gateway_factory, slow_env):
    fake, env = slow_env
    gateway = gateway_factory(env)
    # ~13 MB in 16 KB chunks over ~8 s: far more than the kernel buffers
    # between the gateway and the reader hold (up to 4 MiB of send buffer).
    fake.reply_text = "x" * 16000
    fake.behave("slow_stream", chunks=800, interval=0.02)
    body = b'{"model": "ollama/qwen2.5:7b", "stream": true, ' \
           b'"messages": [{"role": "user", "content": "hi"}]}'
    reader = connect(gateway.port, rcvbuf=4096)
    reader.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                   b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))
    try:
        assert reader.recv(1024).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # The reader now stops reading: the gateway must let go of it, and of its upstream.
        assert fake.wait_for(lambda: fake.client_disconnects >= 1,
                             timeout=STREAM_IDLE_TIMEOUT + 10), \
            "the gateway kept streaming to a client that stopped reading"
        took = time.monotonic() - started
        fake.reset()
        assert chat(gateway.url)
        rest = read_until_closed(reader, limit=32 * 1024 * 1024)
    finally:
        reader.close()
    print(f"non-reading client cut off {took:.1f} s after it stopped reading")
    assert b"[DONE]" not in rest, "the stream was finished, not cut off"


def read_until_closed(sock, limit):
    """Read what is left until EOF or reset; bounded in bytes and time."""
    sock.settimeout(5)
    data = bytearray()
    try:
        while len(data) < limit:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    return bytes(data)


def test_clients_that_never_close_do_not_stall_callers(gateway_factory, slow_env):
    fake, env = slow_env
    gateway = gateway_factory(env)
    # Each asks for "Connection: close", then keeps its end open: gunicorn
    # waits up to 2 s for it to close, which must not hold the worker.
    held = [connect(gateway.port) for _ in range(40)]
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        started = time.monotonic()
        assert chat(gateway.url), "clients that never close stalled a normal caller"
        took = time.monotonic() - started
        answers = [read_until_closed(sock, limit=65536) for sock in held]
    finally:
        for sock in held:
            sock.close()
    print(f"caller answered in {took:.2f} s while 40 clients held their ends open")
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
