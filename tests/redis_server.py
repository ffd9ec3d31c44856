"""Start Debian's redis-server on a free 127.0.0.1 port for tests; skip when it is missing."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def available():
    return os.access(REDIS_SERVER, os.X_OK)


def require():
    """Skip the calling test when redis-server is not installed (CI installs it)."""
    if not available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on loopback, no persistence; restartable on its port."""

    def __init__(self, port=None):
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self._dir = tempfile.mkdtemp(prefix="mana-llm-redis-")

    def start(self, timeout=10.0):
        os.makedirs(self._dir, exist_ok=True)
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", self._dir,
                   "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def ping(self):
        """Tell whether the server answers PING (raw protocol, no client library)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self):
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test, stopped at its end."""
    require()
    server = RedisServer().start()
    yield server
    server.stop()
