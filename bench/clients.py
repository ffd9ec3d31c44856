"""Load generators of the benchmark: wrk, a small Python client, and SSE stream clients.

Every load is bounded: wrk by ``-d``, the Python client by a deadline,
each stream by a socket timeout.
"""

import json
import os
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

import requests

BENCH = os.path.dirname(os.path.abspath(__file__))
CHAT_PATH = "/v1/chat/completions"


@dataclass
class LoadStats:
    """What one load run measured at the client: counts and latency percentiles in ms."""

    requests: int
    errors: int
    seconds: float
    p50: float
    p90: float
    p99: float
    error_sample: str = ""

    @property
    def rps(self):
        return self.requests / self.seconds if self.seconds else 0.0


def chat_body(model, stream=False, **extra):
    """Return the small chat request every load sends."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 16}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def percentile(sorted_values, pct):
    """Return the nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def run_wrk(url, model, connections, duration, headers=None):
    """Run wrk against ``url`` + the chat path (extra request headers); return its LoadStats."""
    argv = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections),
            "-d", f"{duration:g}s", "--timeout", "10s", "--latency",
            "-s", os.path.join(BENCH, "post.lua"), url + CHAT_PATH, "--", model]
    argv += [f"{name}: {value}" for name, value in (headers or {}).items()]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")),
                None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}"
                           f"{result.stderr}")
    doc = json.loads(line.split(" ", 1)[1])
    errors = sum(doc["errors"].values())
    sample = ", ".join(f"{k} {v}" for k, v in doc["errors"].items() if v)
    return LoadStats(doc["requests"], errors, doc["duration_us"] / 1e6,
                     doc["p50_us"] / 1000, doc["p90_us"] / 1000, doc["p99_us"] / 1000,
                     sample)


def _post_loop(session, url, body, deadline, pause, latencies, failures):
    """POST ``body`` until ``deadline``; append latencies (s) and failure texts."""
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            response = session.post(url, data=body, timeout=10,
                                    headers={"Content-Type": "application/json"})
            ok = response.status_code == 200 and response.json().get("choices")
            if not ok:
                failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
        except (requests.RequestException, ValueError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - started)
        time.sleep(pause)


def run_python_load(url, model, threads, duration, rate_per_thread):
    """POST from ``threads`` threads at about ``rate_per_thread`` req/s each; return stats."""
    body = json.dumps(chat_body(model))
    deadline = time.monotonic() + duration
    latencies, failures = [], []
    sessions = [requests.Session() for _ in range(threads)]
    workers = [threading.Thread(target=_post_loop,
                                args=(s, url + CHAT_PATH, body, deadline,
                                      1.0 / rate_per_thread, latencies, failures))
               for s in sessions]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - started
    for session in sessions:
        session.close()
    ms = sorted(x * 1000 for x in latencies)
    return LoadStats(len(latencies), len(failures), seconds, percentile(ms, 50),
                     percentile(ms, 90), percentile(ms, 99),
                     failures[0] if failures else "")


def accepted_connections(upstream_url):
    """Return how many connections the upstream has accepted (nginx's stub_status format)."""
    text = requests.get(upstream_url + "/bench/connections", timeout=5).text
    return int(text.splitlines()[2].split()[0])


def server_timing(url, model, count):
    """Return the medians (ms) of the gateway's own ``Server-Timing`` figures."""
    figures = {}
    with requests.Session() as session:
        for _ in range(count):
            response = session.post(url + CHAT_PATH, json=chat_body(model), timeout=10)
            for part in response.headers.get("Server-Timing", "").split(","):
                name, _, dur = part.strip().partition(";dur=")
                if dur:
                    figures.setdefault(name, []).append(float(dur))
    return {name: statistics.median(values) for name, values in figures.items()}


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    ok: bool
    first_byte: float = 0.0     # seconds from connect to the first ``data:`` line
    total: float = 0.0
    chunks: int = 0
    error: str = ""


def _http_request(port, body):
    """Return the bytes of a POST of ``body`` to the chat path, closing after the answer."""
    data = json.dumps(body).encode()
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def _judge_stream(raw):
    """Return an error text for a finished raw SSE response, or '' if it is whole."""
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return head.split(b"\r\n", 1)[0].decode("latin-1") or "no response"
    if b'"error"' in payload:
        return "error event in stream"
    if b"data: [DONE]" not in payload:
        return "stream ended without [DONE]"
    return ""


def stream_once(port, body, timeout=30.0, on_first=None):
    """Stream one chat completion over a raw socket; return its StreamResult."""
    started = time.perf_counter()
    first, raw = 0.0, b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(_http_request(port, body))
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
                if not first and b"data:" in raw.partition(b"\r\n\r\n")[2]:
                    first = time.perf_counter() - started
                    if on_first:
                        on_first()
    except OSError as exc:
        return StreamResult(False, first, time.perf_counter() - started,
                            error=f"{type(exc).__name__}: {exc}")
    error = _judge_stream(raw)
    return StreamResult(not error, first, time.perf_counter() - started,
                        raw.count(b"data: {"), error)


def first_byte_times(port, model, count, chunks=3, interval=0.01):
    """Stream ``count`` short answers one after another; return their StreamResults."""
    body = chat_body(model, stream=True, bench_chunks=chunks, bench_interval=interval)
    return [stream_once(port, body) for _ in range(count)]


@dataclass
class ManyStreams:
    """The many-streams check: how many were held open at once, and what failed."""

    count: int
    failed: int = 0
    peak_open: int = 0
    late: int = 0               # first byte after more than a second: waited for a thread
    first_byte_max: float = 0.0
    duration_max: float = 0.0
    rss_peak_mib: float = 0.0
    errors: list = field(default_factory=list)


class _OpenCounter:
    """Count streams that have started and not yet finished; remember the peak."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = self.peak = 0

    def opened(self):
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)

    def closed(self):
        with self.lock:
            self.open -= 1


def _one_of_many(port, body, counter, results, timeout):
    """Run one stream of the many; record its result."""
    seen = []

    def on_first():
        seen.append(True)
        counter.opened()

    result = stream_once(port, body, timeout=timeout, on_first=on_first)
    if seen:
        counter.closed()
    results.append(result)


def many_streams(port, model, count, chunks, interval, sample_rss, timeout=60.0):
    """Hold ``count`` slow streams open at once; ``sample_rss()`` is polled meanwhile."""
    body = chat_body(model, stream=True, bench_chunks=chunks, bench_interval=interval)
    counter, results = _OpenCounter(), []
    threading.stack_size(256 * 1024)
    threads = [threading.Thread(target=_one_of_many, args=(port, body, counter, results,
                                                           timeout), daemon=True)
               for _ in range(count)]
    threading.stack_size(0)
    outcome = ManyStreams(count)
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2 * timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        outcome.rss_peak_mib = max(outcome.rss_peak_mib, sample_rss())
        time.sleep(0.1)
    outcome.peak_open = counter.peak
    failed = [r for r in results if not r.ok] + [None] * (count - len(results))
    outcome.failed = len(failed)
    outcome.errors = sorted({r.error if r else "no result" for r in failed})[:5]
    outcome.late = sum(r.first_byte > 1.0 for r in results)
    outcome.first_byte_max = max((r.first_byte for r in results), default=0.0)
    outcome.duration_max = max((r.total for r in results), default=0.0)
    return outcome
