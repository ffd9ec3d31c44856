"""Aliases: load and validate ``aliases.yaml``, resolve model strings to routes.

A file that breaks any rule is rejected whole with a message naming the
alias and the rule, so a reload can never half-apply.
"""

from dataclasses import dataclass


from app import errors
from app.providers import KNOWN_PROVIDERS
from app.yaml_file import read_yaml

MAX_MODEL_LENGTH = 256
MAX_CACHE_TTL = 30 * 86400


class AliasConfigError(ValueError):
    """The alias file is invalid; the message says where and why."""


@dataclass(frozen=True)
class Entry:
    """One step of a chain: a provider and the model name it knows."""

    provider: str
    model: str

    @property
    def label(self):
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    chain: tuple
    cache_ttl: int = None       # seconds its answers are cached (None: not cached)
    cache_shared: bool = False  # callers share its cache entries


@dataclass(frozen=True)
class AliasTable:
    """A validated alias file (immutable: every worker reads it, none changes it)."""

    aliases: dict
    default: str

    def to_doc(self):
        """Return the file's content as plain data (for the reload snapshot)."""
        return {"aliases": {a.name: _alias_doc(a) for a in self.aliases.values()},
                "default": self.default}


def _alias_doc(alias):
    doc = {"description": alias.description, "chain": [e.label for e in alias.chain]}
    if alias.cache_ttl is not None:
        doc["cache_ttl"] = alias.cache_ttl
    if alias.cache_shared:
        doc["cache_shared"] = True
    return doc


def split_entry(text):
    """Return the Entry for ``provider/model`` (model may contain '/').

    The provider prefix is case-insensitive (``Groq/x`` is ``groq/x``);
    the model part is passed on exactly as written.
    """
    provider, _, model = text.partition("/")
    return Entry(provider.lower(), model)


def is_printable_ascii(text):
    """Tell whether ``text`` is printable ASCII: safe in a header, a URL path and a log."""
    return text.isascii() and text.isprintable()


def _check_alias(name, body):
    if not isinstance(name, str) or not name.startswith("mana/"):
        raise AliasConfigError(f"alias {name!r}: name must start with 'mana/'")
    rest = name[len("mana/"):]
    if not is_printable_ascii(name):
        raise AliasConfigError(f"alias {name!r}: name must be printable ASCII")
    if not rest or "/" in rest or rest.strip() != rest:
        raise AliasConfigError(f"alias {name!r}: name must have exactly one segment "
                               "after 'mana/'")
    if not isinstance(body, dict):
        raise AliasConfigError(f"alias {name!r}: body must be a mapping")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise AliasConfigError(f"alias {name!r}: description must be a string")
    chain = body.get("chain")
    if not isinstance(chain, list) or not chain:
        raise AliasConfigError(f"alias {name!r}: chain must be a non-empty list")
    for item in chain:
        _check_entry(name, item)
    return Alias(name, description, tuple(split_entry(i.strip()) for i in chain),
                 *_check_cache(name, body))


def _check_cache(name, body):
    """Return ``(cache_ttl, cache_shared)`` of an alias body."""
    ttl = body.get("cache_ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)
                            or not 0 < ttl <= MAX_CACHE_TTL):
        raise AliasConfigError(f"alias {name!r}: cache_ttl must be a whole number of "
                               f"seconds from 1 to {MAX_CACHE_TTL} (30 days)")
    shared = body.get("cache_shared", False)
    if not isinstance(shared, bool):
        raise AliasConfigError(f"alias {name!r}: cache_shared must be true or false")
    return ttl, shared


def _check_entry(name, item):
    if not isinstance(item, str) or not item.strip():
        raise AliasConfigError(f"alias {name!r}: chain entries must be non-empty "
                               f"strings, got {item!r}")
    if not is_printable_ascii(item):
        raise AliasConfigError(f"alias {name!r}: chain entry {item!r} must be printable "
                               "ASCII")
    provider, sep, model = item.strip().partition("/")
    if not sep or not provider or not model:
        raise AliasConfigError(f"alias {name!r}: chain entry {item!r} needs a "
                               "provider prefix ('provider/model')")
    if provider.lower() not in KNOWN_PROVIDERS:
        raise AliasConfigError(f"alias {name!r}: chain entry {item!r} names unknown "
                               f"provider {provider!r}; known providers: "
                               f"{', '.join(KNOWN_PROVIDERS)}")


def parse_aliases(doc):
    """Return an AliasTable for a parsed YAML document, or raise AliasConfigError."""
    if not isinstance(doc, dict):
        raise AliasConfigError("the root of the alias file must be a mapping")
    raw = doc.get("aliases")
    if not isinstance(raw, dict) or not raw:
        raise AliasConfigError("'aliases' must be a non-empty mapping")
    aliases = {name: _check_alias(name, body) for name, body in raw.items()}
    default = doc.get("default")
    if default is not None and (not isinstance(default, str) or default not in aliases):
        raise AliasConfigError(f"default {default!r} names no defined alias")
    return AliasTable(aliases, default or next(iter(aliases)))


def load_aliases(path):
    """Read, parse and validate an alias file."""
    doc = read_yaml(path, AliasConfigError)
    return parse_aliases(doc)


def check_model_string(model):
    """Raise InvalidRequest for a model string that must not go further."""
    if not isinstance(model, str):
        raise errors.InvalidRequest("'model' must be a string", param="model")
    if len(model) > MAX_MODEL_LENGTH:
        raise errors.InvalidRequest(f"'model' is longer than {MAX_MODEL_LENGTH} characters",
                                    param="model")
    if model != model.strip():
        raise errors.InvalidRequest("'model' must not start or end with white space",
                                    param="model")
    if not is_printable_ascii(model):
        # No provider has a non-ASCII model id, and the resolved model goes
        # back in a response header, which cannot carry it.
        raise errors.InvalidRequest("'model' must be printable ASCII: no control or "
                                    "non-ASCII characters", param="model")


@dataclass(frozen=True)
class Route:
    """Where a request goes: the model string as asked (the default filled in),
    the alias it names (None for a direct model) and the chain to walk."""

    asked: str
    alias: str
    entries: tuple


def resolve_chain(model, table, known_providers):
    """Return the Route for a request's model string (None or "" means the default)."""
    if model is None or model == "":
        model = table.default
    check_model_string(model)
    alias = table.aliases.get(model)
    if alias is not None:
        return Route(model, alias.name, alias.chain)
    if model.startswith("mana/"):
        raise errors.ModelNotFound(
            f"unknown alias {model!r}; known aliases: {', '.join(sorted(table.aliases))}",
            param="model")
    if "/" not in model:
        return Route(model, None, (Entry("ollama", model),))
    provider, _, name = model.partition("/")
    # The prefix names a provider, case-insensitively ("Ollama/gemma3:4b").
    entry = Entry(provider.lower(), name)
    if entry.provider not in known_providers or not entry.model:
        raise errors.ModelNotFound(
            f"unknown provider {entry.provider!r}; known providers: "
            f"{', '.join(known_providers)}", param="model")
    return Route(model, None, (entry,))
