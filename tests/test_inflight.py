"""Calls in flight: whole-answer deadlines and aborts, enforced through the socket.

No wall-clock bounds: an enforced deadline or abort shows in the reason the
call failed with, which a call that merely ran its course cannot have.
"""

import socket
import threading

import pytest

from app import errors
from app.config import build_config
from app.providers import build_providers
from app.providers.inflight import InFlight
from tests.fake_upstream import FakeUpstream

BODY = {"messages": [{"role": "user", "content": "hi"}]}


class Dribbler:
    """Answers ``head``, then ``line`` every ``interval`` seconds (8 s at most), one client."""

    def __init__(self, head, line, interval):
        self.head, self.line, self.interval = head, line, interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def most(self):
        return int(8 / self.interval)

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(self.head)
            for _ in range(self.most):
                if self.stop.wait(self.interval):
                    return
                try:
                    conn.sendall(self.line)
                    self.sent += 1
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.listener.close()


def header_trickler():
    """A status line, then one header line every 0.2 s: the head never completes."""
    return Dribbler(b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", 0.2)


def empty_events():
    """A stream whose events carry no content, one every 0.1 s."""
    return Dribbler(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
                    b'data: {"choices": []}\n\n', 0.1)


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
    server = header_trickler()
    provider = build_providers(build_config({
        "GROQ_API_KEY": "k", "GROQ_BASE_URL": server.url, "UPSTREAM_TIMEOUT": 1}))["groq"]
    call = ticking.begin("groq")
    try:
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            provider.chat(dict(BODY), "m", call)
        # Each header line came well within the timeout: only the whole-answer
        # deadline, enforced from outside, can have ended the call early.
        assert caught.value.reason == "ReadTimeout"
        assert call.aborted == "ReadTimeout"
        assert server.sent < server.most
    finally:
        ticking.end(call)
        server.close()


def test_aborting_a_provider_frees_the_calls_waiting_on_it():
    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        fake.behave("hang", path="/api/chat")
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        outcome = {}

        def wait_on_it():
            call = inflight.begin("ollama")
            try:
                provider.chat(dict(BODY), "qwen2.5:7b", call)
            except errors.GatewayError as exc:
                outcome["error"] = exc
            finally:
                inflight.end(call)

        waiter = threading.Thread(target=wait_on_it)
        waiter.start()
        assert fake.wait_for(lambda: fake.hits("/api/chat") == 1)
        inflight.abort_provider("ollama", "provider-tripped")
        # The fake hangs for two minutes; the read timeout is two minutes too.
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        assert outcome["error"].reason == "provider-tripped"
        assert outcome["error"].on_failure == "trip"


def test_a_finished_call_cannot_abort_its_pooled_connection():
    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        call = inflight.begin("ollama")
        provider.chat(dict(BODY), "qwen2.5:7b", call)
        inflight.end(call)
        call.abort("provider-tripped")  # too late: the socket is back in the pool
        second = inflight.begin("ollama")
        answer = provider.chat(dict(BODY), "qwen2.5:7b", second)
        inflight.end(second)
        assert answer["choices"][0]["message"]["content"] == fake.reply_text
        assert fake.connections_accepted == 1


def test_no_socket_stays_attached_once_calls_are_done():
    inflight = InFlight()
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        for _ in range(5):
            call = inflight.begin("ollama")
            provider.chat(dict(BODY), "qwen2.5:7b", call)
            # The connection is back in the pool before the call ends: it is free.
            assert not call.attached
            inflight.end(call)


def test_a_call_aborted_before_it_attaches_shuts_its_socket_at_once():
    left, right = socket.socketpair()
    with left, right:
        call = InFlight().begin("groq")
        call.abort("provider-tripped")
        call.attach(left)
        assert left.recv(1) == b""  # shut down for reading: EOF at once, no wait


def test_a_detached_socket_is_never_shut_by_a_late_abort():
    left, right = socket.socketpair()
    with left, right:
        call = InFlight().begin("groq")
        call.attach(left)
        call.detach()
        call.abort("provider-tripped")
        right.sendall(b"x")
        assert left.recv(1) == b"x"


def test_aborting_a_provider_leaves_other_providers_calls_alone():
    inflight = InFlight()
    groq, ollama = inflight.begin("groq"), inflight.begin("ollama")
    inflight.abort_provider("groq", "provider-tripped")
    assert (groq.aborted, ollama.aborted) == ("provider-tripped", None)


def test_deadlines_abort_only_late_calls(clock):
    inflight = InFlight(clock=clock)
    late, early, open_ended = (inflight.begin("groq") for _ in range(3))
    late.deadline, early.deadline = 1.0, 5.0
    clock.advance(2)
    inflight.enforce_deadlines()
    assert (late.aborted, early.aborted, open_ended.aborted) == ("ReadTimeout", None, None)


def test_the_wait_for_a_streams_first_content_is_bounded_by_the_read_timeout(ticking):
    from app.streaming import prime

    server = empty_events()
    provider = build_providers(build_config({
        "GROQ_API_KEY": "k", "GROQ_BASE_URL": server.url, "UPSTREAM_TIMEOUT": 1,
        "STREAM_IDLE_TIMEOUT": 30}))["groq"]
    call = ticking.begin("groq")
    try:
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            prime(provider.stream_chat(dict(BODY), "m", call))
        # Events kept coming (the idle timeout never fired): only the deadline ended it.
        assert caught.value.reason == "ReadTimeout"
        assert server.sent < server.most
    finally:
        ticking.end(call)
        server.close()


def test_a_caller_is_gone_only_once_its_peer_closed():
    from app.providers.inflight import caller_left

    left, right = socket.socketpair()
    with left:
        assert not caller_left(left)
        right.sendall(b"GET / HTTP/1.1\r\n")  # it talks: still there, and nothing is read
        assert not caller_left(left)
        assert left.recv(64) == b"GET / HTTP/1.1\r\n"
        right.close()
        assert caller_left(left)


def test_a_watched_stream_is_aborted_when_its_caller_leaves():
    inflight = InFlight()
    call, other = inflight.begin("groq"), inflight.begin("groq")
    inflight.end(call)  # committed: the walk is over, the stream goes on
    left, right = socket.socketpair()
    mine, theirs = socket.socketpair()
    with left, mine, theirs:
        inflight.watch(call, left)
        inflight.watch(other, mine)
        inflight.abort_orphans()
        assert (call.aborted, other.aborted) == (None, None)
        right.close()
        inflight.abort_orphans()
        assert (call.aborted, other.aborted) == ("caller-left", None)


def test_an_unwatched_stream_is_left_alone():
    inflight = InFlight()
    call = inflight.begin("groq")
    left, right = socket.socketpair()
    with left:
        inflight.watch(call, left)
        inflight.unwatch(call)
        right.close()
        inflight.abort_orphans()
        assert call.aborted is None
