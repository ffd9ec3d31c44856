"""The shipped front: deploy/nginx.conf with Debian's nginx before the real gateway."""

import os
import resource
import socket
import threading
import time

import openai
import pytest
import requests

from tests.conftest import REPO, provider_env
from tests.servers import Nginx, nginx_available

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not nginx_available(), reason="nginx is not installed")]

SLOWLORIS = 1000
HEADER_TIMEOUT = 10  # client_header_timeout in deploy/nginx.conf
STREAM_CHUNKS = 10
CALLERS, STREAMS_EACH = 4, 3
HEAD = b"GET /v1/models HTTP/1.1\r\nHost: front\r\nUser-Agent: slow\r\n\r\n"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def front(gateway_factory, fake_factory, tmp_path):
    """A fake Ollama, the gateway in front of it, and nginx in front of the gateway."""
    fake = fake_factory("ollama")
    env = dict(provider_env({"ollama": fake}), ALIASES_PATH=os.path.join(REPO, "aliases.yaml"))
    gateway = gateway_factory(env)
    nginx = Nginx(gateway.port, tmp_path / "nginx").start()
    yield fake, nginx
    nginx.stop()


def sdk(nginx, timeout=30):
    return openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused", max_retries=0,
                         timeout=timeout)


def stream_text(client):
    """Stream one chat answer through the front; return its text and finish reason."""
    text, finish = [], None
    for chunk in client.chat.completions.create(model="ollama/qwen2.5:7b",
                                                messages=MESSAGES, stream=True):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


class Slowloris:
    """Many connections to the front, each sending one byte of a head per tick, never all."""

    def __init__(self, port, count):
        self.socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            self.socks.append(sock)
        self.open = set(range(count))
        self.sent = 0

    def tick(self):
        byte = HEAD[self.sent % (len(HEAD) - 1):][:1]
        for index in list(self.open):
            sock = self.socks[index]
            try:
                sock.send(byte)
                if sock.recv(4096) == b"":
                    self.open.discard(index)
            except BlockingIOError:
                pass
            except OSError:
                self.open.discard(index)
        self.sent += 1

    def close(self):
        for sock in self.socks:
            sock.close()


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def test_streams_through_the_front_are_unbuffered(front):
    fake, nginx = front
    # The upstream sends two chunks, then goes silent: they can only reach
    # the caller if nothing between buffers the stream.
    fake.behave("stall_after", times=1, chunks=2)
    stream = sdk(nginx, timeout=10).chat.completions.create(
        model="ollama/qwen2.5:7b", messages=MESSAGES, stream=True)
    try:
        pieces = []
        for chunk in stream:
            pieces += [c.delta.content for c in chunk.choices if c.delta.content]
            if len(pieces) == 2:
                break
    finally:
        stream.close()
    assert len(pieces) == 2


def test_slowloris_on_the_front_does_not_touch_callers(front):
    fake, nginx = front
    fake.behave("slow_stream", chunks=STREAM_CHUNKS, interval=0.1)
    raise_fd_limit(SLOWLORIS + 512)
    started = time.monotonic()
    attack = Slowloris(nginx.port, SLOWLORIS)
    print(f"{SLOWLORIS} slow connections open after {time.monotonic() - started:.1f} s")
    results, errors = [], []

    def caller():
        client = sdk(nginx)
        for _ in range(STREAMS_EACH):
            try:
                results.append(stream_text(client))
            except Exception as exc:  # reported below, with the others
                errors.append(repr(exc))

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    try:
        for thread in threads:
            thread.start()
        # Keep the attack going while the callers stream, then until nginx's
        # header timeout has had its chance to close every slow connection.
        deadline = started + HEADER_TIMEOUT + 8
        while time.monotonic() < deadline and (attack.open or any(
                t.is_alive() for t in threads)):
            attack.tick()
            time.sleep(0.5)
        for thread in threads:
            thread.join(timeout=30)
        still_open = len(attack.open)
    finally:
        attack.close()
    print(f"streams: {len(results)} complete, errors: {errors}; "
          f"slow connections still open at the end: {still_open}")
    assert not errors
    assert len(results) == CALLERS * STREAMS_EACH
    for text, finish in results:
        assert len(text.split()) == STREAM_CHUNKS and finish == "stop"
    assert still_open == 0, "nginx kept slow connections past client_header_timeout"
    # The gateway never saw the attack: only the callers' requests reached it.
    assert fake.hits("/api/chat") == CALLERS * STREAMS_EACH
    assert requests.get(nginx.url + "/health", timeout=5).status_code == 200
