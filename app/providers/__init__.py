"""Provider adapters by name, and building them from the config."""

from app.config import CLOUD_PROVIDERS
from app.providers.base import Transport
from app.providers.gemini import GeminiProvider
from app.providers.ollama import OllamaProvider
from app.providers.openai_compat import OpenAICompatProvider

PROVIDER_CLASSES = {
    "ollama": OllamaProvider,
    "openrouter": OpenAICompatProvider,
    "groq": OpenAICompatProvider,
    "together": OpenAICompatProvider,
    "openai": OpenAICompatProvider,
    "google": GeminiProvider,
}
KNOWN_PROVIDERS = ("ollama",) + tuple(CLOUD_PROVIDERS)


def _auth_headers(name, key):
    if name == "google":
        return {"x-goog-api-key": key}
    return {"Authorization": f"Bearer {key}"}


def build_providers(config):
    """Return ``{name: provider}`` for every known provider; unconfigured ones marked so."""
    common = {"connect_timeout": config["CONNECT_TIMEOUT"],
              "pool_size": config["GUNICORN_THREADS"],
              "cooldown": config["RATE_LIMIT_COOLDOWN"]}
    providers = {"ollama": OllamaProvider(
        "ollama",
        Transport("ollama", config["OLLAMA_URL"], read_timeout=config["OLLAMA_TIMEOUT"],
                  **common),
        stream_idle_timeout=config["STREAM_IDLE_TIMEOUT"])}
    for name in CLOUD_PROVIDERS:
        key = config[f"{name.upper()}_API_KEY"]
        transport = Transport(name, config[f"{name.upper()}_BASE_URL"],
                              headers=_auth_headers(name, key) if key else {},
                              read_timeout=config["UPSTREAM_TIMEOUT"], **common)
        providers[name] = PROVIDER_CLASSES[name](
            name, transport, configured=bool(key),
            stream_idle_timeout=config["STREAM_IDLE_TIMEOUT"])
    return providers
