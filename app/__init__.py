"""mana-llm: an OpenAI-compatible LLM gateway with health-aware fallback.

``create_app`` builds everything a worker needs (config, provider
adapters, alias table, health cache, prober, chain walker, metrics
recorder), hangs it on ``app.extensions["mana_llm"]`` and registers the
blueprints. Nothing is started here: gunicorn's ``post_worker_init``
hook calls ``Gateway.start`` after fork, because threads do not survive
a fork.
"""

import json
import os
from dataclasses import dataclass

from flask import Flask

from app import config as config_module
from app.auth import install_auth
from app.cache import ResponseCache
from app.cache_store import open_cache_store
from app.callers import caller_table
from app.cors import install_cors
from app.errors import register_error_handlers
from app.metrics import LabelCap, Recorder
from app.prices import load_prices, parse_prices
from app.providers import KNOWN_PROVIDERS, build_providers
from app.providers.inflight import InFlight
from app.quotas import CallerBook, Quotas, workers_from
from app.redact import Redactor
from app.request_log import configure_logging, install_request_log
from app.routing.aliases import AliasTable, load_aliases, parse_aliases, resolve_chain
from app.routing.board import open_board
from app.routing.breaker import HealthCache
from app.routing.capacity import Capacity
from app.routing.fallback import ChainWalker
from app.routing.probes import Prober

__version__ = "0.1.0"


@dataclass
class Gateway:
    """The state of one worker, built once and shared by its threads."""

    config: dict
    providers: dict
    configured: dict        # the providers that have what they need to be called
    aliases: AliasTable     # a reload replaces the workers, never the table
    health: HealthCache
    prober: Prober
    walker: ChainWalker
    recorder: Recorder
    redactor: Redactor
    capacity: Capacity      # slots of the capped providers; counts calls in flight
    cache: ResponseCache = None

    def route(self, model):
        """Return the Route for a request's model string (the default when it is empty)."""
        return resolve_chain(model, self.aliases, KNOWN_PROVIDERS)

    def start(self):
        """Start the background work of a worker (after fork)."""
        for name in self.configured:
            self.recorder.provider_health(name, True)
        self.recorder.shared_state_up(self.health.board_up)
        self.health.start()  # loads the shared board's state before the worker serves
        self.prober.start()
        self._start_capacity()

    def _start_capacity(self):
        for name in self.configured:
            self.recorder.provider_inflight(name, 0)   # every series exists from boot
        self.capacity.start()

    def stop(self):
        self.capacity.stop()
        self.prober.stop()
        self.health.stop()
        for provider in self.providers.values():
            provider.close()
        if self.cache is not None and self.cache.store is not None:
            self.cache.store.close()


# Set by gunicorn's master: the configuration and alias table it last accepted.
SNAPSHOT_VARIABLE = "MANA_LLM_SNAPSHOT"


def load_settings(test_config=None):
    """Return ``(config, alias table)``.

    Under gunicorn the master's accepted snapshot is used, so a worker
    never reads a ``.env`` or alias file that the master rejected (a
    worker that failed to boot would bring the whole server down).
    Otherwise: ``test_config``, or the environment and ``.env``.
    """
    if test_config is not None:
        config = config_module.build_config(test_config)
        return config, load_aliases(config["ALIASES_PATH"])
    snapshot = os.environ.get(SNAPSHOT_VARIABLE)
    if snapshot:
        accepted = json.loads(snapshot)
        return config_module.build_config(accepted["env"]), parse_aliases(accepted["aliases"])
    config = config_module.from_env(dotenv_path=".env")
    return config, load_aliases(config["ALIASES_PATH"])


def load_callers(config, test_config=None):
    """Return ``(caller table, price table)``: the master's accepted ones under gunicorn."""
    snapshot = os.environ.get(SNAPSHOT_VARIABLE) if test_config is None else None
    if snapshot:
        accepted = json.loads(snapshot)
        return caller_table(config, accepted.get("callers")), parse_prices(accepted.get("prices"))
    return caller_table(config), load_prices(config["PRICES_PATH"])


def build_callers(config, test_config, recorder):
    """Return the worker's CallerBook; its quotas count on a board of their own."""
    table, prices = load_callers(config, test_config)
    quotas = Quotas(open_board(config), workers=workers_from(), recorder=recorder)
    return CallerBook(table, quotas, prices, recorder)


def build_gateway(config, table):
    """Build a worker's Gateway from a validated config and alias table."""
    redactor = Redactor(config_module.secrets(config))
    providers = build_providers(config, redactor)
    configured = {name: p for name, p in providers.items() if p.configured}
    board = open_board(config)
    health = HealthCache(configured, threshold=config["FAILURE_THRESHOLD"],
                         backoff=config["UNHEALTHY_BACKOFF"], board=board)
    inflight = InFlight()
    prober = Prober(configured, health, interval=config["PROBE_INTERVAL"],
                    timeout=config["PROBE_TIMEOUT"], inflight=inflight)
    recorder = Recorder(LabelCap(config["METRICS_LABEL_CAP"], _known_labels(table)))
    health.subscribe(recorder.provider_health)
    if board is not None:
        board.subscribe(recorder.shared_state_up)
    capacity = Capacity(config_module.provider_caps(config), board=board,
                        workers=config["WEB_CONCURRENCY"], queue_timeout=config["QUEUE_TIMEOUT"])
    capacity.subscribe(recorder.provider_inflight)
    walker = ChainWalker(providers, health, inflight, recorder, capacity)
    cache = ResponseCache(config, open_cache_store(config), recorder)
    return Gateway(config, providers, configured, table, health, prober, walker, recorder,
                   redactor, capacity, cache)


def _known_labels(table):
    """Return the label values that never count against the metrics' cap."""
    known = {""} | set(table.aliases)
    for alias in table.aliases.values():
        known.update(e.label for e in alias.chain)
        known.update(e.model for e in alias.chain)
    return known


def create_app(test_config=None):
    """Build the Flask app; ``test_config`` replaces the environment (tests)."""
    cfg, table = load_settings(test_config)
    gateway = build_gateway(cfg, table)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg["MAX_BODY_BYTES"]
    app.json.sort_keys = False
    app.extensions["mana_llm"] = gateway
    configure_logging(cfg["LOG_LEVEL"], gateway.redactor)
    install_request_log(app, gateway.recorder)
    install_auth(app, build_callers(cfg, test_config, gateway.recorder))
    install_cors(app, cfg["CORS_ORIGINS"])
    register_error_handlers(app)
    _register_blueprints(app)
    return app


def _register_blueprints(app):
    from app.api import aliases, chat, health, metrics, models

    for module in (chat, models, aliases, health, metrics):
        app.register_blueprint(module.bp)
    app.register_blueprint(__import__("app.api.openapi", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("app.api.usage", fromlist=["bp"]).bp)


__all__ = ["create_app", "load_settings", "SNAPSHOT_VARIABLE", "KNOWN_PROVIDERS", "__version__"]
