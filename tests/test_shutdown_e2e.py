"""SIGTERM drains: new connections are refused at once, streams in flight finish whole."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from tests.conftest import REPO, provider_env, wait_until

pytestmark = pytest.mark.e2e

CHUNKS = 30


def stream_chat(url, into):
    """Stream one chat answer, appending each data line to ``into``."""
    body = {"model": "ollama/qwen2.5:7b", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True,
                       timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                into.append(line[len(b"data: "):])


def probe(port):
    """Return "refused", or "served" if a new connection was answered, else "hung"."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
            return "served" if sock.recv(64).startswith(b"HTTP/1.1 200") else "hung"
        except OSError:
            return "hung"


def test_term_refuses_new_connections_and_finishes_streams(gateway_factory, fake_factory):
    fake = fake_factory("ollama")
    env = dict(provider_env({"ollama": fake}), ALIASES_PATH=os.path.join(REPO, "aliases.yaml"))
    gateway = gateway_factory(env)
    fake.behave("slow_stream", chunks=CHUNKS, interval=0.15)  # ~4.5 s
    lines = []
    streamer = threading.Thread(target=stream_chat, args=(gateway.url, lines))
    streamer.start()
    try:
        assert wait_until(lambda: len(lines) >= 2, timeout=10), "the stream did not start"
        gateway.process.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        probes = []
        while time.monotonic() - termed < 3 and "refused" not in probes:
            probes.append(probe(gateway.port))
        refused_after = time.monotonic() - termed
        streamer.join(timeout=30)
        assert not streamer.is_alive()
        gateway.process.wait(timeout=60)
    finally:
        streamer.join(timeout=1)
    print(f"probes after TERM: {probes}; refused {refused_after:.2f} s after TERM; "
          f"stream had {len(lines)} data lines")
    assert probes[-1] == "refused", "new connections were still accepted during the drain"
    assert "hung" not in probes, "a new connection was accepted but never answered"
    assert lines[-1] == b"[DONE]", "the stream in flight was cut by the drain"
    text = "".join(choice["delta"].get("content") or ""
                   for line in lines[:-1] for choice in json.loads(line)["choices"])
    assert len(text.split()) == CHUNKS
    assert gateway.process.returncode == 0


def test_term_with_nothing_in_flight_exits_promptly(gateway_factory, fake_factory):
    fake = fake_factory("ollama")
    env = dict(provider_env({"ollama": fake}), ALIASES_PATH=os.path.join(REPO, "aliases.yaml"))
    gateway = gateway_factory(env)
    assert requests.get(gateway.url + "/health", timeout=5).status_code == 200
    gateway.process.send_signal(signal.SIGTERM)
    try:
        # Generous: a worker still loading the app on a loaded box finishes
        # that first; a leaked connection count would hang for 600 s.
        gateway.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the master did not exit after TERM with nothing in flight")
    assert probe(gateway.port) == "refused"


def test_pidfile_names_the_master_for_hup(gateway_factory, fake_factory, tmp_path):
    fake = fake_factory("ollama")
    pidfile = tmp_path / "mana-llm.pid"
    env = dict(provider_env({"ollama": fake}), ALIASES_PATH=os.path.join(REPO, "aliases.yaml"),
               PIDFILE=str(pidfile))
    gateway = gateway_factory(env)
    master = int(pidfile.read_text().strip())
    assert master == gateway.process.pid
    old_workers = set(gateway.worker_pids())
    os.kill(master, signal.SIGHUP)  # what `kill -HUP $(cat "$PIDFILE")` does
    assert wait_until(lambda: len(set(gateway.worker_pids()) - old_workers) == 2
                      and not old_workers & set(gateway.worker_pids()), timeout=30), \
        "HUP to the pidfile's PID did not replace the workers"
    gateway.process.send_signal(signal.SIGTERM)
    gateway.process.wait(timeout=60)
    assert not pidfile.exists(), "the pidfile outlived the master"
