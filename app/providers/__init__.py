"""Every provider's facts in one registry, and building the adapters from the config."""

from dataclasses import dataclass

from app.providers.gemini import GeminiProvider
from app.providers.ollama import OllamaProvider
from app.providers.openai_compat import OpenAICompatProvider
from app.providers.transport import Transport
from app.redact import Redactor


@dataclass(frozen=True)
class ProviderFacts:
    """What the gateway knows about one provider before it reads any config."""

    cls: type
    default_url: str
    url_var: str            # the environment variable naming its base URL
    key_var: str = None     # ... and its API key (None: it needs none and is always on)
    timeout_var: str = "UPSTREAM_TIMEOUT"
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "

    def auth_headers(self, key):
        return {self.auth_header: self.auth_prefix + key} if key else {}


REGISTRY = {
    "ollama": ProviderFacts(OllamaProvider, "http://localhost:11434", "OLLAMA_URL",
                            timeout_var="OLLAMA_TIMEOUT"),
    "openrouter": ProviderFacts(OpenAICompatProvider, "https://openrouter.ai/api/v1",
                                "OPENROUTER_BASE_URL", "OPENROUTER_API_KEY"),
    "groq": ProviderFacts(OpenAICompatProvider, "https://api.groq.com/openai/v1",
                          "GROQ_BASE_URL", "GROQ_API_KEY"),
    "together": ProviderFacts(OpenAICompatProvider, "https://api.together.xyz/v1",
                              "TOGETHER_BASE_URL", "TOGETHER_API_KEY"),
    "openai": ProviderFacts(OpenAICompatProvider, "https://api.openai.com/v1",
                            "OPENAI_BASE_URL", "OPENAI_API_KEY"),
    # The key travels in a header, never in a URL.
    "google": ProviderFacts(GeminiProvider, "https://generativelanguage.googleapis.com/v1beta",
                            "GOOGLE_BASE_URL", "GOOGLE_API_KEY",
                            auth_header="x-goog-api-key", auth_prefix=""),
}
KNOWN_PROVIDERS = tuple(REGISTRY)


def build_providers(config, redactor=None):
    """Return ``{name: provider}`` for every known provider; unconfigured ones marked so."""
    redactor = redactor or Redactor()
    providers = {}
    for name, facts in REGISTRY.items():
        key = config[facts.key_var] if facts.key_var else ""
        transport = Transport(name, config[facts.url_var], headers=facts.auth_headers(key),
                              connect_timeout=config["CONNECT_TIMEOUT"],
                              read_timeout=config[facts.timeout_var],
                              pool_size=config["GUNICORN_THREADS"])
        providers[name] = facts.cls(
            name, transport, redactor=redactor,
            configured=facts.key_var is None or bool(key),
            stream_idle_timeout=config["STREAM_IDLE_TIMEOUT"],
            cooldown=config["RATE_LIMIT_COOLDOWN"])
    return providers
