"""A small OpenAI-compatible upstream for the benchmark: fixed answers and slow SSE.

Run it as its own process (``python bench/upstream.py``) so that it never
shares a GIL with the load generator: it prints ``PORT <n>`` once it
listens and serves until it is killed. A streamed request is shaped by
two extra body fields, which the gateway passes through untouched:
``bench_chunks`` (content chunks, default 20) and ``bench_interval``
(seconds between them, default 0.1). The first chunk carries content and
is sent at once, so time to first byte measures the path, not the model.
"""

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "gpt-4o-mini"
COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000,
                                      "owned_by": "bench"}]}
COMPLETION_JSON = json.dumps(COMPLETION, separators=(",", ":"))
MODELS_JSON = json.dumps(MODELS, separators=(",", ":"))


def status_text(accepted):
    """Return nginx's stub_status text, so one parser reads both upstreams' counters."""
    return (f"Active connections: 0 \nserver accepts handled requests\n"
            f" {accepted} {accepted} 0 \nReading: 0 Writing: 0 Waiting: 0 \n")


def chunk_event(delta, finish_reason=None, usage=None):
    """Return one SSE event holding a ``chat.completion.chunk``."""
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
             "created": 1700000000, "model": MODEL, "choices": choices}
    if usage:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def stream_events(chunks, interval):
    """Yield the SSE events of one answer, sleeping ``interval`` between content chunks."""
    yield chunk_event({"role": "assistant", "content": "tok0 "})
    for index in range(1, chunks):
        time.sleep(interval)
        yield chunk_event({"content": f"tok{index} "})
    yield chunk_event({}, finish_reason="stop")
    yield chunk_event(None, usage={"prompt_tokens": 9, "completion_tokens": chunks,
                                   "total_tokens": 9 + chunks})
    yield b"data: [DONE]\n\n"


class Handler(BaseHTTPRequestHandler):
    """Answer ``GET .../models`` and ``POST .../chat/completions``; 404 otherwise."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without this Nagle's
        # algorithm can hold the second one for a delayed ACK (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        with self.server.lock:
            self.server.accepted += 1

    def log_message(self, *args):
        """Stay quiet: a log line per request would cost more than the answer."""

    def do_GET(self):
        if self.path.split("?")[0].endswith("/models"):
            self._send(200, MODELS_JSON)
        elif self.path == "/bench/connections":
            self._send(200, status_text(self.server.accepted), "text/plain")
        else:
            self._send(404, '{"error":{"message":"not found"}}')

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._send(400, '{"error":{"message":"bad json"}}')
        if not self.path.endswith("/chat/completions"):
            return self._send(404, '{"error":{"message":"not found"}}')
        if body.get("stream"):
            return self._send_stream(int(body.get("bench_chunks", 20)),
                                     float(body.get("bench_interval", 0.1)))
        return self._send(200, COMPLETION_JSON)

    def _send(self, status, text, content_type="application/json"):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, chunks, interval):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in stream_events(chunks, interval):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    """A thread per connection, with a backlog deep enough for 500 streams at once."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.accepted = 0


def main():
    """Serve on 127.0.0.1 until killed; print the port first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
