"""Fixtures: fake upstreams, in-process apps, and the real gateway under gunicorn."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from tests.canned_upstream import CannedUpstream
from tests.fake_upstream import FakeUpstream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")
KEYS = {"groq": "test-groq-key-0123456789", "openrouter": "sk-or-test-0123456789abcdef",
        "together": "test-together-key-01234", "openai": "sk-test-openai-0123456789",
        "google": "AIzaTestGoogleKey0123456789"}


class FakeClock:
    """A monotonic clock that only moves when a test steps it."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


# A 1x1 PNG, and a function tool, for requests that carry images and tools.
PIXEL = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8A"
         "AAAASUVORK5CYII=")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_aliases(path, aliases, default=None):
    """Write an alias file from ``{name: [entries]}``; return its path."""
    doc = {"aliases": {name: {"description": name, "chain": chain}
                       for name, chain in aliases.items()}}
    if default:
        doc["default"] = default
    path.write_text(yaml.safe_dump(doc))
    return str(path)


class Gunicorn:
    """The real gateway: ``gunicorn -c gunicorn.conf.py`` as a subprocess on 127.0.0.1."""

    def __init__(self, env, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items()
                    if not k.endswith(("_API_KEY", "_BASE_URL")) and k not in (
                        "OLLAMA_URL", "PROMETHEUS_MULTIPROC_DIR", "ALIASES_PATH")}
        self.env.update({"HOST": "127.0.0.1", "PORT": str(self.port),
                         "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "16"})
        self.env.update(env)
        self.process = None

    def start(self, expect_ready=True):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py"], cwd=REPO,
                                        env=self.env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if expect_ready and not wait_until(self._ready, timeout=30):
            self.stop()
            raise RuntimeError("gateway did not start:\n" + self.log())
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise RuntimeError("gateway exited:\n" + self.log())
        try:
            return requests.get(self.url + "/health", timeout=1).status_code == 200 \
                and len(self.worker_pids()) == int(self.env["WEB_CONCURRENCY"])
        except requests.RequestException:
            return False

    def log(self):
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def worker_pids(self):
        """Return the pids of the master's live children (the workers)."""
        path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        try:
            with open(path) as handle:
                return [int(p) for p in handle.read().split()]
        except OSError:
            return []

    def hup(self):
        self.process.send_signal(signal.SIGHUP)

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        if self.process and self.process.poll() is None:
            # SIGQUIT: quick shutdown; a graceful one would wait for hung upstreams.
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process:
            self._log.close()


@pytest.fixture
def fake_factory():
    """Start fake upstreams on demand; all are stopped at the end of the test."""
    started = []

    def start(name):
        fake = FakeUpstream(name=name).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def canned():
    """A local server answering what the test registers (``responses``-style, but real)."""
    server = CannedUpstream()
    yield server
    server.close()


@pytest.fixture
def upstreams(fake_factory):
    """One fake upstream per provider, keyed by provider name."""
    return {name: fake_factory(name) for name in ("ollama", "groq", "openrouter", "google")}


def provider_env(upstreams):
    """Return the environment that points every provider at its fake upstream."""
    env = {}
    for name, fake in upstreams.items():
        if name == "ollama":
            env["OLLAMA_URL"] = fake.url
            continue
        env[f"{name.upper()}_API_KEY"] = KEYS[name]
        suffix = "/v1beta" if name == "google" else "/v1"
        env[f"{name.upper()}_BASE_URL"] = fake.url + suffix
    return env


@pytest.fixture
def gateway_factory(tmp_path):
    """Start real gateways under gunicorn; all are stopped at the end of the test."""
    started = []

    def start(env, expect_ready=True):
        env = dict(env)
        env.setdefault("ALIASES_PATH", os.path.join(REPO, "aliases.yaml"))
        server = Gunicorn(env, tmp_path / f"gateway-{len(started)}.log")
        started.append(server)
        return server.start(expect_ready=expect_ready)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(gateway_factory, upstreams):
    """A gateway with every provider pointed at its fake upstream."""
    return gateway_factory(provider_env(upstreams))


@pytest.fixture
def app_factory(tmp_path):
    """Build in-process apps (Flask test client) from a config dict."""
    from app import create_app

    apps = []

    def build(config=None):
        app = create_app(dict(config or {}))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["mana_llm"].stop()


class Stack:
    """Fake upstreams for every provider and one gateway pointed at them."""

    def __init__(self, fakes, server):
        self.fakes = fakes
        self.server = server
        self.url = server.url

    def client(self, **kw):
        """Return an official OpenAI SDK client for the gateway."""
        import openai

        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=30, **kw)

    def reset(self):
        for fake in self.fakes.values():
            fake.reset()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    """A gateway shared by a module's tests that leave provider health alone."""
    fakes = {name: FakeUpstream(name=name).start()
             for name in ("ollama", "groq", "openrouter", "google")}
    env = provider_env(fakes)
    env["ALIASES_PATH"] = os.path.join(REPO, "aliases.yaml")
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    server = Gunicorn(env, log_path)
    try:
        server.start()
        yield Stack(fakes, server)
    finally:
        server.stop()
        for fake in fakes.values():
            fake.stop()


@pytest.fixture
def stack(module_stack):
    """The module's shared gateway, with every fake upstream back to normal."""
    module_stack.reset()
    return module_stack
