"""The response cache: which requests it serves, their keys, and where answers are kept.

A request is looked up by a key: the SHA-256 of a canonical JSON of the
normalised request (the endpoint, the model string as the caller asked
it, every body field that changes the answer, and the caller's name
unless the alias shares its entries). ``stream``, ``stream_options`` and
``user`` do not change the answer and are left out: a kept stream is
replayed chunk for chunk to a streamed request and added up into one
answer for a plain one; a kept plain answer is cut into chunks for a
streamed request.

Answers are kept in a bounded LRU of each worker's own, in front of a
store on the shared board (``app.cache_store``: a SQLite file of the
instance, or Redis for a fleet). A board that is down is skipped by its
breaker: the request is a miss, never an error.
"""

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from app import shapes
from app.routing.aliases import MAX_CACHE_TTL

log = logging.getLogger(__name__)

HEADER = "X-Mana-LLM-Cache"
# Body fields that never change the answer.
IGNORED = frozenset({"model", "stream", "stream_options", "user"})
EMBEDDING_IGNORED = frozenset({"model", "input", "encoding_format", "user"})
# An answer that stopped for any other reason (``length``: truncated,
# ``content_filter``: blocked) is never kept.
COMPLETE = frozenset({"stop", "tool_calls", "function_call"})
MAX_TTL = MAX_CACHE_TTL  # a max-age beyond it is taken as it
# The fewest bytes a float of a vector takes in JSON ("0.0" or "1e-05", and a comma).
FLOAT_BYTES = 4


# --- what a request asks of the cache ---------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What the cache does for one request: ``key`` "" means neither look nor keep."""

    key: str = ""
    ttl: int = 0            # seconds a fresh answer is kept (0: not kept)
    max_age: int = 0        # the oldest entry the caller accepts
    lookup: bool = False    # False for ``no-cache``: refresh the entry

    @property
    def result(self):
        """Return the header value of an answer that was not a hit."""
        return "miss" if self.key else "bypass"


BYPASS = Plan()


def cache_control(header):
    """Return ``(directives, max_age)`` of a Cache-Control request header."""
    directives, max_age = set(), None
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isdigit():
                max_age = min(int(value), MAX_TTL)
        elif name:
            directives.add(name)
    return directives, max_age


def _number(value):
    """Return a number in its canonical form (2.0 and 2 are one value)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Values a list may hold as they are: no float to normalise, nothing to descend into.
PLAIN = frozenset({str, int, bool, type(None)})


def _canonical(value):
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        # Checked in C: any caller may send max-age, and a 20 MiB body of
        # numbers walked one by one here cost 4 s of CPU per request.
        if set(map(type, value)) <= PLAIN:
            return value
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return _number(value)


def request_key(endpoint, asked, fields, caller):
    """Return the SHA-256 (hex) of the canonical JSON of a normalised request."""
    doc = {"endpoint": endpoint, "model": asked, "caller": caller, "body": _canonical(fields)}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def plan_chat(body, route, aliases, caller, header):
    """Return the Plan of a chat completion request (after validation)."""
    directives, max_age = cache_control(header)
    if "no-store" in directives:
        return BYPASS
    alias = aliases.aliases.get(route.alias) if route.alias else None
    alias_ttl = getattr(alias, "cache_ttl", None)
    ttl = alias_ttl or max_age
    if not ttl:
        return BYPASS
    # A sampled answer is one of many: reused only when the caller asks for it.
    temperature = body.get("temperature")
    if max_age is None and isinstance(temperature, (int, float)) and temperature > 0:
        return BYPASS
    scope = None if getattr(alias, "cache_shared", False) else caller
    fields = {k: v for k, v in body.items() if k not in IGNORED}
    return Plan(request_key("chat", route.asked, fields, scope), ttl,
                ttl if max_age is None else max_age, "no-cache" not in directives)


def plan_embeddings(body, inputs, route, aliases, caller, header, ttl):
    """Return the Plan of an embeddings request: always cached (vectors are deterministic)."""
    directives, max_age = cache_control(header)
    if "no-store" in directives or not ttl:
        return BYPASS
    alias = aliases.aliases.get(route.alias) if route.alias else None
    scope = None if getattr(alias, "cache_shared", False) else caller
    fields = {k: v for k, v in body.items() if k not in EMBEDDING_IGNORED}
    fields["input"] = list(inputs)
    # Float vectors are kept; each request gets its own encoding.
    return Plan(request_key("embeddings", route.asked, fields, scope), ttl,
                ttl if max_age is None else max_age, "no-cache" not in directives)


# --- what is kept -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One kept answer: ``kind`` answer (a chat body), chunks (a stream) or vectors."""

    kind: str
    data: object
    resolved: str
    usage: dict
    created: float
    expires: float

    def encode(self):
        return json.dumps({"kind": self.kind, "data": self.data, "resolved": self.resolved,
                           "usage": self.usage, "created": self.created,
                           "expires": self.expires}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw):
        """Return the Entry ``raw`` encodes, or None for one that is not ours (a miss)."""
        try:
            doc = json.loads(raw)
            return cls(doc["kind"], doc["data"], doc["resolved"], doc.get("usage") or {},
                       float(doc["created"]), float(doc["expires"]))
        except (ValueError, KeyError, TypeError):
            log.warning("a response cache entry could not be read; treated as a miss")
            return None

    def age(self, now):
        return max(0, int(now - self.created))


def complete_answer(answer):
    """Tell whether a plain chat answer may be kept: every choice finished normally."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    return bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") in COMPLETE
                                 for c in choices)


class StreamTape:
    """The chunks of a live stream, kept as they pass, for the cache (bounded).

    ``done()`` is called by the view only after a clean end; it hands a
    complete stream to ``on_complete(chunks, usage)``.
    """

    def __init__(self, limit, on_complete):
        self.chunks = []
        self.finish = set()
        self.usage = {}
        self._size = 0
        self._limit = limit
        self._on_complete = on_complete

    def add(self, chunk):
        """Keep a copy of a chunk (before the view drops what the caller did not ask for)."""
        if self._size > self._limit:
            return
        raw = json.dumps(chunk, separators=(",", ":"))
        self._size += len(raw)
        self.chunks.append(json.loads(raw))
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish.add(choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]

    def complete(self):
        """Tell whether the stream may be kept: it finished normally and fits."""
        return self._size <= self._limit and bool(self.finish) and self.finish <= COMPLETE

    def done(self):
        """Keep the stream, which ended cleanly, if it is complete."""
        if self.complete():
            self._on_complete(self.chunks, self.usage)


# --- where it is kept -------------------------------------------------------------------------

class WorkerLRU:
    """A worker's own bounded LRU of encoded entries; the least recently used go first."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries = OrderedDict()   # key -> (raw, expires)
        self._lock = threading.Lock()

    def get(self, key, now):
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if found[1] <= now:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key, raw, expires):
        if len(raw) > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            self._entries[key] = (raw, expires)
            self.bytes += len(raw)
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key):
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= len(found[0])


class ResponseCache:
    """The worker's LRU in front of the board's store; counts what it does."""

    def __init__(self, config, store=None, recorder=None, *, wall=time.time):
        self.local = WorkerLRU(config["CACHE_WORKER_BYTES"])
        self.store = store      # a GuardedBoard over a cache store, or None
        self.max_bytes = config["CACHE_MAX_BYTES"]
        self.max_entry = config["CACHE_MAX_ENTRY_BYTES"]
        self.embeddings_ttl = config["CACHE_EMBEDDINGS_TTL"]
        self._recorder = recorder
        self._wall = wall

    def lookup(self, plan):
        """Return the Entry that answers ``plan``, or None (and count the result)."""
        if not plan.key:
            self._count("bypass")
            return None
        entry = self._find(plan) if plan.lookup else None
        self._count("hit" if entry is not None else "miss")
        return entry

    def _find(self, plan):
        now = self._wall()
        entry = _fresh(self.local.get(plan.key, now), plan, now)
        if entry is None and self.store is not None:
            self.store.reconnect()
            raw = self.store.cache_get(plan.key)
            entry = _fresh(raw, plan, now)
            if entry is not None:  # the next lookup of this worker needs no board round trip
                self.local.put(plan.key, raw, entry.expires)
        return entry

    def keep(self, plan, kind, data, resolved, usage):
        """Keep a fresh answer for ``plan.ttl`` seconds; return whether it was kept."""
        if not plan.key or not plan.ttl:
            return False
        if size_floor(kind, data) > self.max_entry:
            return False   # refused before it is encoded: that alone can cost seconds
        now = self._wall()
        raw = Entry(kind, data, resolved, usage or {}, now, now + plan.ttl).encode()
        if len(raw) > self.max_entry:
            return False
        self.local.put(plan.key, raw, now + plan.ttl)
        self._gauge("worker", self.local.bytes)
        if self.store is None or not self.max_bytes:
            return True
        total = self.store.cache_put(plan.key, raw, now + plan.ttl, self.max_bytes)
        if total is None:
            self._count("store_error")
            return False
        self._gauge("board", total)
        return True

    def tape(self, plan, resolved):
        """Return a StreamTape that keeps a live stream for ``plan``, or None."""
        if not plan.key or not plan.ttl:
            return None
        return StreamTape(self.max_entry, lambda chunks, usage: self.keep(
            plan, "chunks", chunks, resolved, usage))

    def saved(self, entry, prices):
        """Count the tokens and cost a hit saved (the original answer's usage)."""
        if self._recorder is None:
            return
        provider, _, model = entry.resolved.partition("/")
        prompt, completion = (_count(entry.usage.get(k))
                              for k in ("prompt_tokens", "completion_tokens"))
        cost = prices.cost(provider, model, prompt, completion) if prices else 0.0
        self._recorder.cache_saved(provider, prompt, completion, cost)

    def _count(self, result):
        if self._recorder is not None:
            self._recorder.cache_result(result)

    def _gauge(self, store, size):
        if self._recorder is not None:
            self._recorder.cache_bytes(store, size)


def size_floor(kind, data):
    """Return a cheap lower bound of the bytes an entry of ``data`` encodes to.

    Embeddings are cached by default, and 2,048 inputs of 3,072 dimensions
    encode to about 120 MB of JSON (seconds of CPU) only to be refused by
    CACHE_MAX_ENTRY_BYTES; counting their floats costs microseconds.
    """
    if kind == "vectors" and isinstance(data, dict):
        return FLOAT_BYTES * sum(len(v) for v in data.get("vectors") or ()
                                 if isinstance(v, list))
    if kind == "answer" and isinstance(data, dict):
        return sum(len(c["message"]["content"]) for c in data.get("choices") or ()
                   if isinstance(c, dict) and isinstance(c.get("message"), dict)
                   and isinstance(c["message"].get("content"), str))
    return 0


def _count(value):
    """Return a token count as reported, or 0 when it is not a plain number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        return 0
    return value


def _fresh(raw, plan, now):
    """Return the Entry ``raw`` holds if it has not expired and is young enough for ``plan``."""
    entry = Entry.decode(raw) if raw is not None else None
    if entry is None or entry.expires <= now or entry.age(now) > plan.max_age:
        return None
    return entry


# --- one answer, two shapes -------------------------------------------------------------------

def as_chunks(answer):
    """Return the chunks a stream of a kept plain answer sends (role, content, tools, end)."""
    rid, created, model = answer.get("id"), answer.get("created", 0), answer.get("model", "")
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    out = [shapes.chunk(rid, created, model, {"role": "assistant", "content": ""})]
    if message.get("content"):
        out.append(shapes.chunk(rid, created, model, {"content": message["content"]}))
    calls = message.get("tool_calls") or []
    if calls:
        out.append(shapes.chunk(rid, created, model, {
            "tool_calls": [dict(call, index=i) for i, call in enumerate(calls)]}))
    out.append(shapes.chunk(rid, created, model, {}, choice.get("finish_reason")))
    if answer.get("usage"):
        out.append(shapes.usage_chunk(rid, created, model, answer["usage"]))
    return out


def as_answer(chunks):
    """Return the plain answer a kept stream adds up to."""
    content, calls, finish, usage = [], {}, None, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or ():
                _add_call(calls, call)
            finish = choice.get("finish_reason") or finish
    message = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    first = chunks[0]
    body = shapes.completion(first.get("model", ""), message, finish, usage, first.get("id"))
    body["created"] = first.get("created", body["created"])
    return body


def _add_call(calls, delta):
    """Add one streamed tool call delta to the calls assembled so far (by index)."""
    call = calls.setdefault(delta.get("index", 0), {
        "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = delta.get("id") or call["id"]
    function = delta.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""
