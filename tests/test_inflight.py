"""Calls in flight: whole-answer deadlines and aborts, enforced through the socket."""

import socket
import threading
import time

import pytest

from app import errors
from app.config import build_config
from app.providers import build_providers
from app.providers.inflight import InFlight
from tests.fake_upstream import FakeUpstream

BODY = {"messages": [{"role": "user", "content": "hi"}]}


class HeaderTrickler:
    """Answers a status line, then one header line every ``interval`` seconds (8 s at most)."""

    def __init__(self, interval=0.2):
        self.interval = interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(int(8 / self.interval)):
                if self.stop.wait(self.interval):
                    return
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.fixture
def ticking():
    """An InFlight whose deadlines are enforced every 50 ms, as the prober's tick does."""
    inflight = InFlight()
    stop = threading.Event()

    def tick():
        while not stop.wait(0.05):
            inflight.enforce_deadlines()

    threading.Thread(target=tick, daemon=True).start()
    yield inflight
    stop.set()


def test_trickled_headers_cannot_outlast_the_read_timeout(ticking):
    server = HeaderTrickler()
    provider = build_providers(build_config({
        "GROQ_API_KEY": "k", "GROQ_BASE_URL": server.url, "UPSTREAM_TIMEOUT": 1}))["groq"]
    call = ticking.begin("groq")
    started = time.monotonic()
    try:
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            provider.chat(dict(BODY), "m")
    finally:
        ticking.end(call)
        server.close()
    assert caught.value.reason == "ReadTimeout"
    assert time.monotonic() - started < 3


def test_aborting_a_provider_frees_the_calls_waiting_on_it():
    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        fake.behave("hang", path="/api/chat")
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        outcome = {}

        def wait_on_it():
            call = inflight.begin("ollama")
            try:
                provider.chat(dict(BODY), "qwen2.5:7b")
            except errors.GatewayError as exc:
                outcome["error"] = exc
            finally:
                inflight.end(call)

        waiter = threading.Thread(target=wait_on_it)
        waiter.start()
        assert fake.wait_for(lambda: fake.hits("/api/chat") == 1)
        started = time.monotonic()
        inflight.abort_provider("ollama", "provider-tripped")
        waiter.join(timeout=5)
        assert not waiter.is_alive()
        assert time.monotonic() - started < 2
        assert outcome["error"].reason == "provider-tripped"
        assert outcome["error"].on_failure == "trip"


def test_a_finished_call_cannot_abort_its_pooled_connection():
    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        call = inflight.begin("ollama")
        provider.chat(dict(BODY), "qwen2.5:7b")
        inflight.end(call)
        call.abort("provider-tripped")  # too late: the socket is back in the pool
        second = inflight.begin("ollama")
        answer = provider.chat(dict(BODY), "qwen2.5:7b")
        inflight.end(second)
        assert answer["choices"][0]["message"]["content"] == fake.reply_text
        adapter = provider.transport.session.get_adapter(fake.url)
        pool = next(iter(adapter.poolmanager.pools._container.values()))
        assert pool.num_connections == 1


def test_no_socket_stays_owned_once_calls_are_done():
    from app.providers import inflight as module

    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        for _ in range(5):
            call = inflight.begin("ollama")
            provider.chat(dict(BODY), "qwen2.5:7b")
            # The connection is back in the pool before the call ends: it is free.
            assert call.sock is None
            inflight.end(call)
    assert not module._owners
