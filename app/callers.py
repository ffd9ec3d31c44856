"""Callers: the key file (``KEYS_PATH``), its validation, and who a presented key is.

The file holds SHA-256 hashes of keys, never a key. A presented key is
hashed once and looked up in a dict of hashes. That lookup is not a
timing oracle on the secret: what the dict compares is a digest of the
key, and an attacker who could learn a digest's prefix from timing
still cannot choose a key that has it (that would be a preimage on
SHA-256), so a sweep of ``hmac.compare_digest`` over every hash (O(n)
per request) would buy nothing.

A file that breaks any rule is rejected whole with a message naming the
caller and the rule, so a reload never half-applies.
"""

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field


from app import errors
from app.yaml_file import read_yaml

NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
LIMITS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
# The one caller of GPU_API_KEY alone, and the one of a gateway without auth.
DEFAULT_CALLER = "default"
ANONYMOUS = "anonymous"


class KeysConfigError(ValueError):
    """The key file is invalid; the message says where and why."""


def hash_key(key):
    """Return the line a key file holds for ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Caller:
    """One named caller: its key hashes, allowed model globs and limits."""

    name: str
    hashes: tuple = ()
    models: tuple = ()            # empty: every model
    limits: dict = field(default_factory=dict)

    def allows(self, model):
        """Tell whether ``model`` (as asked) matches one of the caller's globs."""
        if not self.models:
            return True
        names = (model,) if "/" in model else (model, "ollama/" + model)
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.models
                   for name in names)

    def require_model(self, model):
        """Raise Forbidden unless the caller may ask for ``model``."""
        if not self.allows(model):
            raise errors.Forbidden(f"caller {self.name!r} may not use model {model!r}",
                                   param="model")

    def to_doc(self):
        doc = {"name": self.name, "keys": list(self.hashes)}
        if self.models:
            doc["models"] = list(self.models)
        if self.limits:
            doc["limits"] = dict(self.limits)
        return doc


@dataclass(frozen=True)
class CallerTable:
    """A validated key file: immutable; ``required`` False means auth is off."""

    callers: dict
    by_hash: dict
    required: bool = True

    def find(self, key):
        """Return the Caller a presented key belongs to, or None."""
        return self.by_hash.get(hash_key(key)) if key else None

    def to_doc(self):
        """Return the file's content as plain data (for the reload snapshot)."""
        return {"callers": [c.to_doc() for c in self.callers.values()]}


def open_table():
    """Return the table of a gateway without auth: everyone is ``anonymous``."""
    return CallerTable({ANONYMOUS: Caller(ANONYMOUS)}, {}, required=False)


def single_key_table(api_key):
    """Return the table of GPU_API_KEY alone: one caller named ``default``."""
    caller = Caller(DEFAULT_CALLER, (hash_key(api_key),))
    return CallerTable({caller.name: caller}, {caller.hashes[0]: caller})


def _where(index, item):
    name = item.get("name") if isinstance(item, dict) else None
    return f"caller {name!r}" if isinstance(name, str) else f"caller #{index + 1}"


def _check_limits(where, raw):
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise KeysConfigError(f"{where}: limits must be a mapping")
    for name, value in raw.items():
        if name not in LIMITS:
            raise KeysConfigError(f"{where}: unknown limit {name!r}; known: "
                                  f"{', '.join(LIMITS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KeysConfigError(f"{where}: {name} must be a whole number >= 1")
    return dict(raw)


def _check_models(where, raw):
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise KeysConfigError(f"{where}: models must be a non-empty list of globs")
    for glob in raw:
        if not isinstance(glob, str) or not glob.strip() or not glob.isascii() \
                or not glob.isprintable():
            raise KeysConfigError(f"{where}: model glob {glob!r} must be printable ASCII")
    return tuple(raw)


def _check_caller(index, item):
    where = _where(index, item)
    if not isinstance(item, dict):
        raise KeysConfigError(f"{where}: must be a mapping")
    unknown = set(item) - {"name", "keys", "models", "limits"}
    if unknown:
        raise KeysConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    name = item.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise KeysConfigError(f"{where}: name must match [a-z0-9_-]{{1,32}}")
    keys = item.get("keys")
    if not isinstance(keys, list) or not keys:
        raise KeysConfigError(f"{where}: keys must be a non-empty list of "
                              "'sha256:<hex>' (python -m app hash-key)")
    for key in keys:
        if not isinstance(key, str) or not HASH_RE.fullmatch(key):
            raise KeysConfigError(f"{where}: key {str(key)[:12]!r}... is not 'sha256:' and "
                                  "64 lower-case hex digits (python -m app hash-key)")
    return Caller(name, tuple(keys), _check_models(where, item.get("models")),
                  _check_limits(where, item.get("limits")))


def parse_keys(doc):
    """Return a CallerTable for a parsed YAML document, or raise KeysConfigError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("callers"), list) \
            or not doc["callers"]:
        raise KeysConfigError("the key file must be a mapping with a non-empty "
                              "'callers' list")
    callers, by_hash = {}, {}
    for index, item in enumerate(doc["callers"]):
        caller = _check_caller(index, item)
        if caller.name in callers:
            raise KeysConfigError(f"caller {caller.name!r}: name is used twice")
        for key in caller.hashes:
            if key in by_hash:
                raise KeysConfigError(f"caller {caller.name!r}: key {key[:15]}... is also "
                                      f"caller {by_hash[key].name!r}'s")
            by_hash[key] = caller
        callers[caller.name] = caller
    return CallerTable(callers, by_hash)


def load_keys(path):
    """Read, parse and validate a key file."""
    doc = read_yaml(path, KeysConfigError)
    try:
        return parse_keys(doc)
    except KeysConfigError as exc:
        raise KeysConfigError(f"{path}: {exc}") from None


def caller_table(config, doc=None):
    """Return the table a config asks for: the key file's, GPU_API_KEY's, or auth off."""
    if not config.get("GPU_REQUIRE_AUTH", True):
        return open_table()
    if doc is not None:
        return parse_keys(doc)
    if config.get("KEYS_PATH"):
        return load_keys(config["KEYS_PATH"])
    if config.get("GPU_API_KEY"):
        return single_key_table(config["GPU_API_KEY"])
    return open_table()
