"""The transport against real local servers: reuse, no proxies, no redirects, bounds."""

import json
import socket
import ssl
import subprocess
import threading
import time

import pytest
from urllib3.connection import HTTPConnection

from app import errors
from app.config import build_config
from app.providers import build_providers
from app.providers.transport import Transport, socket_of
from tests.conftest import wait_until
from tests.fake_upstream import FakeUpstream

BODY = {"messages": [{"role": "user", "content": "hi"}]}


def transport(url, **kw):
    kw.setdefault("read_timeout", 5)
    return Transport("groq", url, connect_timeout=3, pool_size=4, **kw)


def test_socket_of_is_the_connections_socket_while_connected():
    # The one attribute urllib3 does not document that the transport relies on:
    # this fails loudly if a release renames or drops it.
    with FakeUpstream(name="groq") as fake:
        host, port = fake.url.split("//")[1].split(":")
        conn = HTTPConnection(host, int(port), timeout=3)
        assert socket_of(conn) is None
        conn.connect()
        assert isinstance(socket_of(conn), socket.socket)
        assert socket_of(conn).getpeername()[1] == int(port)
        conn.close()
        assert socket_of(conn) is None


def test_sends_identity_encoding_and_its_own_headers(canned):
    canned.post("/v1/x", json={})
    transport(canned.url + "/v1", headers={"Authorization": "Bearer k"}).fetch(
        "POST", "/x", b"{}")
    sent = canned.calls[0].request.headers
    assert (sent["Accept-Encoding"], sent["Authorization"]) == ("identity", "Bearer k")


def test_environment_proxies_are_ignored(canned, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    canned.get("/v1/models", json={"data": []})
    assert transport(canned.url + "/v1").fetch("GET", "/models").status == 200


def test_query_parameters_are_encoded(canned):
    canned.get("/v1/models", json={})
    transport(canned.url + "/v1").fetch("GET", "/models", params={"a": "x y", "b": "1"})
    assert canned.calls[0].request.params == {"a": "x y", "b": "1"}


def test_an_answer_over_the_size_limit_is_an_upstream_error(canned):
    canned.get("/v1/big", body=b"x" * 300_000)
    with pytest.raises(errors.UpstreamError) as caught:
        transport(canned.url + "/v1", max_answer_bytes=100_000).fetch("GET", "/big")
    assert (caught.value.reason, caught.value.on_failure) == ("too-large", "trip")


def test_whole_answers_reuse_one_connection():
    with FakeUpstream(name="groq") as fake:
        provider = build_providers(build_config({
            "GROQ_API_KEY": "k", "GROQ_BASE_URL": fake.url + "/v1"}))["groq"]
        for _ in range(5):
            provider.chat(dict(BODY), "m")
        assert fake.connections_accepted == 1


def test_a_connection_the_upstream_closed_while_idle_is_replaced():
    with FakeUpstream(name="groq") as fake:
        provider = build_providers(build_config({
            "GROQ_API_KEY": "k", "GROQ_BASE_URL": fake.url + "/v1"}))["groq"]
        provider.chat(dict(BODY), "m")
        fake.stop()  # closes the kept-alive connection; same port again
        fake.start()
        assert provider.chat(dict(BODY), "m")["choices"]


class LateTerminatorServer:
    """An SSE server that sends [DONE], pauses, then the chunked terminator,
    as a real server's separate write does; counts accepted connections."""

    EVENTS = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as reader:
            while True:
                length = 0
                for line in iter(reader.readline, b"\r\n"):
                    if not line:
                        return
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n"
                                for e in self.EVENTS) + b"data: [DONE]\n\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(body) + body + b"\r\n")
                time.sleep(0.05)
                conn.sendall(b"0\r\n\r\n")

    def close(self):
        self.listener.close()


class InformationalFirstServer:
    """Answers each request with a bodiless status at once (``status``: 1xx, 204) and,
    ``delay`` later on the same connection, a 200 naming the request it answers."""

    def __init__(self, status, delay=0.3):
        self.status = status
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._answer(conn)
        except OSError:
            pass  # the transport closed the connection: what it should do

    def _answer(self, conn):
        with conn, conn.makefile("rb") as reader:
            for _ in range(20):
                length = 0
                for line in iter(reader.readline, b"\r\n"):
                    if not line:
                        return
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                asked = reader.read(length)
                conn.sendall(b"HTTP/1.1 %d Wait\r\n\r\n" % self.status)
                time.sleep(self.delay)
                answer = b'{"answer_for": %s}' % asked
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("status", [102, 103, 204])
def test_a_bodiless_status_never_hands_the_next_call_an_earlier_answer(status):
    # http.client takes a 1xx other than 100 (or a 204) as the whole answer; the
    # upstream's real answer arrives later on that connection. Kept for the next
    # call, it would be read as the next caller's answer: one caller gets another's.
    server = InformationalFirstServer(status)
    try:
        upstream = transport(server.url)
        answers = [upstream.fetch("POST", "/chat", b'{"caller": %d}' % n) for n in range(3)]
        for n, reply in enumerate(answers):
            if reply.status == 200:
                assert json.loads(reply.body)["answer_for"] == {"caller": n}
            else:
                assert reply.status == status
    finally:
        server.close()


def test_stream_ended_by_done_returns_its_connection_to_the_pool():
    server = LateTerminatorServer()
    try:
        provider = build_providers(build_config({"GROQ_API_KEY": "k",
                                                 "GROQ_BASE_URL": server.url}))["groq"]
        for _ in range(4):
            chunks = list(provider.stream_chat(dict(BODY), "m"))
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert server.accepted == 1
    finally:
        server.close()


def test_finished_streams_give_their_connection_back():
    with FakeUpstream(name="groq") as fake:
        provider = build_providers(build_config({
            "GROQ_API_KEY": "k", "GROQ_BASE_URL": fake.url + "/v1"}))["groq"]
        for _ in range(3):
            text = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in provider.stream_chat(dict(BODY), "m") if c["choices"])
            assert text == fake.reply_text
        provider.chat(dict(BODY), "m")
        assert fake.connections_accepted == 1


def test_ollama_stream_reuses_its_connection():
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        for _ in range(3):
            chunks = list(provider.stream_chat(dict(BODY), "qwen2.5:7b"))
            assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert fake.connections_accepted == 1


def test_gemini_stream_read_to_its_end_reuses_its_connection():
    with FakeUpstream(name="google") as fake:
        provider = build_providers(build_config({
            "GOOGLE_API_KEY": "k", "GOOGLE_BASE_URL": fake.url + "/v1beta"}))["google"]
        for _ in range(3):
            chunks = list(provider.stream_chat(dict(BODY), "gemini-2.0-flash-exp"))
            assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert fake.connections_accepted == 1


def test_abandoned_stream_closes_its_connection():
    with FakeUpstream(name="groq") as fake:
        fake.behave("slow_stream", interval=0.05, chunks=50)
        provider = build_providers(build_config({
            "GROQ_API_KEY": "k", "GROQ_BASE_URL": fake.url + "/v1"}))["groq"]
        stream = provider.stream_chat(dict(BODY), "m")
        next(stream)
        next(stream)
        stream.close()
        assert fake.wait_for(lambda: fake.stream_write_failures >= 1, timeout=5)


def test_an_upstream_whose_certificate_is_not_trusted_is_refused(tmp_path):
    # A self-signed certificate for 127.0.0.1: the connection must fail, not be used.
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    handshakes = []

    def serve():
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True):
                handshakes.append("completed")
        except (ssl.SSLError, OSError):
            handshakes.append("refused")

    threading.Thread(target=serve, daemon=True).start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            transport(url).fetch("GET", "/models")
    finally:
        listener.close()
    assert caught.value.reason == "ConnectionError"
    assert wait_until(lambda: handshakes, timeout=10) == ["refused"]
