"""The transport against a real server: kept-alive connections are reused."""

import json
import socket
import threading
import time

from app.config import build_config
from app.providers import build_providers
from tests.fake_upstream import FakeUpstream

BODY = {"messages": [{"role": "user", "content": "hi"}]}


def pool_of(provider):
    adapter = provider.transport.session.get_adapter(provider.transport.base_url)
    return next(iter(adapter.poolmanager.pools._container.values()))


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
        assert pool_of(provider).num_connections == 1


def test_ollama_stream_reuses_its_connection():
    with FakeUpstream(name="ollama") as fake:
        provider = build_providers(build_config({"OLLAMA_URL": fake.url}))["ollama"]
        for _ in range(3):
            chunks = list(provider.stream_chat(dict(BODY), "qwen2.5:7b"))
            assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert pool_of(provider).num_connections == 1


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
