"""The price table (``prices.yaml``): USD per million tokens, and what a call cost.

``models`` prices a ``provider/model`` as the chain entries name it;
``defaults`` prices every other model of a provider. A model with
neither costs 0 and ``python -m app check-config`` lists it as a warning.
"""

from dataclasses import dataclass


from app.providers import KNOWN_PROVIDERS
from app.yaml_file import read_yaml

PER_TOKENS = 1_000_000
FREE = (0.0, 0.0)


class PricesConfigError(ValueError):
    """The price file is invalid; the message says where and why."""


@dataclass(frozen=True)
class PriceTable:
    """Validated prices: ``(prompt, completion)`` USD per million tokens."""

    models: dict
    defaults: dict

    def price(self, provider, model):
        """Return ``(prompt, completion)`` for a call, or None when nothing prices it."""
        found = self.models.get(f"{provider}/{model}")
        return found if found is not None else self.defaults.get(provider)

    def cost(self, provider, model, prompt_tokens, completion_tokens):
        """Return what a call cost in USD (0 when unpriced)."""
        prompt, completion = self.price(provider, model) or FREE
        return (prompt * prompt_tokens + completion * completion_tokens) / PER_TOKENS

    def unpriced(self, labels):
        """Return the ``provider/model`` labels among ``labels`` that nothing prices."""
        out = []
        for label in labels:
            provider, _, model = label.partition("/")
            if self.price(provider, model) is None and label not in out:
                out.append(label)
        return out

    def to_doc(self):
        """Return the file's content as plain data (for the reload snapshot)."""
        pair = lambda p: {"prompt": p[0], "completion": p[1]}  # noqa: E731
        return {"defaults": {k: pair(v) for k, v in self.defaults.items()},
                "models": {k: pair(v) for k, v in self.models.items()}}


def _pair(where, raw):
    if not isinstance(raw, dict) or set(raw) != {"prompt", "completion"}:
        raise PricesConfigError(f"{where}: needs exactly 'prompt' and 'completion' "
                                "(USD per million tokens)")
    for name in ("prompt", "completion"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value < 1e6:
            raise PricesConfigError(f"{where}: {name} must be a number from 0 to 999999")
    return (float(raw["prompt"]), float(raw["completion"]))


def parse_prices(doc):
    """Return a PriceTable for a parsed YAML document, or raise PricesConfigError."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or set(doc) - {"defaults", "models"}:
        raise PricesConfigError("the price file must be a mapping of 'defaults' and "
                                "'models'")
    defaults, models = doc.get("defaults") or {}, doc.get("models") or {}
    if not isinstance(defaults, dict) or not isinstance(models, dict):
        raise PricesConfigError("'defaults' and 'models' must be mappings")
    for provider in defaults:
        if provider not in KNOWN_PROVIDERS:
            raise PricesConfigError(f"default {provider!r}: unknown provider; known: "
                                    f"{', '.join(KNOWN_PROVIDERS)}")
    for label in models:
        provider, sep, model = str(label).partition("/")
        if not sep or not model or provider not in KNOWN_PROVIDERS:
            raise PricesConfigError(f"model {label!r}: must be 'provider/model' with a "
                                    "known provider")
    return PriceTable({k: _pair(f"model {k!r}", v) for k, v in models.items()},
                      {k: _pair(f"default {k!r}", v) for k, v in defaults.items()})


def load_prices(path):
    """Read, parse and validate a price file; no path means no prices (all cost 0)."""
    if not path:
        return PriceTable({}, {})
    doc = read_yaml(path, PricesConfigError)
    try:
        return parse_prices(doc)
    except PricesConfigError as exc:
        raise PricesConfigError(f"{path}: {exc}") from None
