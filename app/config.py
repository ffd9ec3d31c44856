"""Configuration: defaults, reading the environment once, validation.

Nothing here does I/O at import. ``from_env`` reads ``os.environ`` (and a
``.env`` file when asked); ``build_config`` validates a mapping of raw
values, so tests build apps from a dict and the environment goes through
exactly the same checks.
"""

import os
from urllib.parse import urlsplit

from app.providers import REGISTRY

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each provider's variables (base URL, API key) come from the provider registry.
_URL_VARS = tuple(facts.url_var for facts in REGISTRY.values())
_KEY_VARS = tuple(facts.key_var for facts in REGISTRY.values() if facts.key_var)

_FLOATS = {
    "CONNECT_TIMEOUT": 3.0,
    "OLLAMA_TIMEOUT": 120.0,
    "UPSTREAM_TIMEOUT": 120.0,
    "UNHEALTHY_BACKOFF": 60.0,
    "RATE_LIMIT_COOLDOWN": 15.0,
    "PROBE_INTERVAL": 30.0,
    "PROBE_TIMEOUT": 3.0,
    "STREAM_IDLE_TIMEOUT": 60.0,
    # Seconds the last eligible entry (or a named model) waits for a capped provider's slot.
    "QUEUE_TIMEOUT": 30.0,
}
_INTS = {
    "PORT": 3025,
    "FAILURE_THRESHOLD": 2,
    "MAX_BODY_BYTES": 20 * 1024 * 1024,
    "GUNICORN_THREADS": 384,
    "METRICS_LABEL_CAP": 50,
    # Response cache: the board's store, each worker's LRU, one entry; embeddings' TTL (s).
    "CACHE_MAX_BYTES": 256 * 1024 * 1024,
    "CACHE_WORKER_BYTES": 32 * 1024 * 1024,
    "CACHE_MAX_ENTRY_BYTES": 1024 * 1024,
    "CACHE_EMBEDDINGS_TTL": 86400,
    # Workers per instance (gunicorn reads it too): a cap's per-worker share without a board.
    "WEB_CONCURRENCY": 2,
}
_STRINGS = {
    "LOG_LEVEL": "info",
    "ALIASES_PATH": os.path.join(REPO_ROOT, "aliases.yaml"),
    "GPU_API_KEY": "",
    # Callers: a YAML file of named keys (unset: GPU_API_KEY alone is the caller "default").
    "KEYS_PATH": "",
    # The caller whose key may read every caller's /v1/usage.
    "ADMIN_KEY_NAME": "",
    "PRICES_PATH": os.path.join(REPO_ROOT, "prices.yaml"),
    "CORS_ORIGINS": "",
    "PROMETHEUS_MULTIPROC_DIR": "",
    # Unset: this instance's own SQLite board; sqlite:///path, redis://host:port/db, memory.
    "SHARED_STATE_URL": "",
    "SHARED_STATE_PREFIX": "mana-llm:",
}
_BOOLS = {"GPU_REQUIRE_AUTH": True}
_STRINGS.update({facts.url_var: facts.default_url for facts in REGISTRY.values()})
_STRINGS.update({name: "" for name in _KEY_VARS})
# <PROVIDER>_MAX_CONCURRENCY: calls in flight to that provider; unset, no cap.
_CAP_VARS = {name: f"{name.upper()}_MAX_CONCURRENCY" for name in REGISTRY}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def read_env(environ=None, dotenv_path=None):
    """Return the raw values of our variables: the environment over a .env file."""
    environ = dict(os.environ if environ is None else environ)
    if dotenv_path and os.path.exists(dotenv_path):
        from dotenv import dotenv_values

        for key, value in dotenv_values(dotenv_path).items():
            environ.setdefault(key, value or "")
    known = set(_FLOATS) | set(_INTS) | set(_STRINGS) | set(_BOOLS) | set(_CAP_VARS.values())
    return {k: v for k, v in environ.items() if k in known}


def from_env(environ=None, dotenv_path=None):
    """Return the validated config from the environment (and a .env file)."""
    return build_config(read_env(environ, dotenv_path))


def build_config(raw):
    """Return a config dict: defaults overlaid with ``raw``, every value checked."""
    config = {}
    for name, default in _FLOATS.items():
        config[name] = _number(name, raw.get(name, default), float)
    for name, default in _INTS.items():
        config[name] = _number(name, raw.get(name, default), int)
    for name, default in _STRINGS.items():
        value = raw.get(name, default)
        config[name] = default if value is None else str(value).strip()
    for name, default in _BOOLS.items():
        config[name] = _boolean(name, raw.get(name, default))
    for name in _CAP_VARS.values():
        config[name] = _cap(name, raw.get(name))
    _check(config)
    config["CORS_ORIGINS"] = [o.strip() for o in config["CORS_ORIGINS"].split(",")
                              if o.strip()]
    # Test hooks and anything else the caller passed that we do not parse.
    for name, value in raw.items():
        config.setdefault(name, value)
    return config


def _number(name, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number != number or number < 0 or number in (float("inf"),):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _cap(name, value):
    """Return a concurrency cap (None: unset, no cap); a whole number >= 1 otherwise."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a whole number >= 1 (or unset for no cap), "
                          f"got {value!r}")
    return int(text)


def provider_caps(config):
    """Return ``{provider: cap}`` of the providers with a concurrency cap."""
    return {provider: config[name] for provider, name in _CAP_VARS.items()
            if config.get(name) is not None}


def _boolean(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _check(config):
    if config["LOG_LEVEL"].lower() not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
    for name in ("CONNECT_TIMEOUT", "PROBE_TIMEOUT", "STREAM_IDLE_TIMEOUT",
                 "OLLAMA_TIMEOUT", "UPSTREAM_TIMEOUT"):
        if config[name] <= 0:
            raise ConfigError(f"{name} must be greater than 0")
    for name in ("FAILURE_THRESHOLD", "MAX_BODY_BYTES", "GUNICORN_THREADS", "WEB_CONCURRENCY"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be at least 1")
    if not 0 < config["PORT"] < 65536:
        raise ConfigError("PORT must be between 1 and 65535")
    for name in _URL_VARS:
        parts = urlsplit(config[name])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name} must be an http(s) URL, got {config[name]!r}")
    for name in _KEY_VARS + ("GPU_API_KEY",):
        if config[name] and not config[name].isascii():
            raise ConfigError(f"{name} must be ASCII (HTTP headers carry it)")
    _check_shared_state(config["SHARED_STATE_URL"], config["SHARED_STATE_PREFIX"])


def _check_shared_state(url, prefix):
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port
        except ValueError:
            raise ConfigError("SHARED_STATE_URL has an invalid port") from None
        if not parts.hostname or parts.path.strip("/") not in ("", *map(str, range(16))):
            raise ConfigError("SHARED_STATE_URL must be redis://host:port/db (db 0-15)")
    elif parts.scheme == "sqlite":
        if parts.netloc or not parts.path.strip("/"):
            raise ConfigError("SHARED_STATE_URL must be sqlite:///absolute/path/to/file")
    elif url not in ("", "memory"):
        raise ConfigError("SHARED_STATE_URL must be unset, memory, sqlite:///path or "
                          "redis://host:port/db")
    if not prefix or len(prefix) > 100 or any(c.isspace() for c in prefix):
        raise ConfigError("SHARED_STATE_PREFIX must be 1-100 characters without spaces")


def secrets(config):
    """Return every secret in the config, for redaction."""
    found = [config[n] for n in _KEY_VARS + ("GPU_API_KEY",) if config.get(n)]
    board_password = urlsplit(config.get("SHARED_STATE_URL") or "").password
    return found + [board_password] if board_password else found
