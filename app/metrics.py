"""Metric definitions (SPEC §10), the recorder the router calls, and /metrics.

The metrics are defined once per process, here. Under gunicorn,
``PROMETHEUS_MULTIPROC_DIR`` is set by the master before any worker
imports ``prometheus_client``, so every value lives in a per-process
mmap file and ``render`` aggregates them with a fresh registry per
scrape (prometheus_client's multiprocess mode).
"""

import os
import threading

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client import multiprocess

from serving.metrics_archive import directory_lock

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERFLOW = "other"

REQUESTS = Counter("mana_llm_requests_total", "HTTP requests",
                   ["method", "endpoint", "status"])
REQUEST_LATENCY = Histogram("mana_llm_request_latency_seconds", "HTTP latency",
                            ["method", "endpoint"], buckets=LATENCY_BUCKETS)
LLM_REQUESTS = Counter("mana_llm_llm_requests_total", "LLM calls that answered",
                       ["provider", "model", "streaming"])
TOKENS = Counter("mana_llm_tokens_total", "Tokens reported by upstreams",
                 ["provider", "model", "type"])
LLM_LATENCY = Histogram("mana_llm_llm_latency_seconds",
                        "Upstream latency (to the whole answer, or a stream's first chunk)",
                        ["provider", "model"], buckets=LATENCY_BUCKETS)
LLM_ERRORS = Counter("mana_llm_llm_errors_total", "Failed LLM calls",
                     ["provider", "model", "error_type"])
ALIAS_RESOLVED = Counter("mana_llm_alias_resolved_total", "Which entry served an alias",
                         ["alias", "target"])
FALLBACKS = Counter("mana_llm_fallback_total",
                    "Each skip or failure that moved a chain on (to_model empty: ran out)",
                    ["from_model", "to_model", "reason"])
# livemin: each worker has its own health cache, so each writes its own
# view; the scrape shows 0 when any live worker is skipping the provider
# (some callers are being routed away from it), and a dead worker's
# values drop out instead of freezing a stale 0 or 1.
PROVIDER_HEALTHY = Gauge("mana_llm_provider_healthy", "1 healthy, 0 tripped",
                         ["provider"], multiprocess_mode="livemin")
# livemin: 0 as soon as one live worker cannot reach the shared board (it
# then works from its own cache alone); always 1 with SHARED_STATE_URL=memory.
SHARED_STATE_UP = Gauge("mana_llm_shared_state_up",
                        "1 when this instance's workers reach the shared board, 0 otherwise",
                        multiprocess_mode="livemin")
# livesum: each worker counts its own calls in flight (a stream until it
# ends), so the scrape is this instance's total; sum it over instances for
# a fleet on one Redis. /v1/health shows the board's own count of a capped one.
PROVIDER_INFLIGHT = Gauge("mana_llm_provider_inflight",
                          "Calls in flight to a provider (streams until they end)",
                          ["provider"], multiprocess_mode="livesum")


class LabelCap:
    """Bound the label values that callers invent.

    Known values (aliases, chain entries, configured models) always pass;
    any other value is admitted until ``cap`` distinct ones were seen in
    this process, after which it is reported as ``other``. With W
    workers a metric gains at most W x cap invented series.
    """

    def __init__(self, cap, known=()):
        self._cap = cap
        self._known = set(known)
        self._seen = set()
        self._lock = threading.Lock()

    def __call__(self, value):
        if value in self._known or value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(value)
                return value
        return OVERFLOW


class Recorder:
    """What the router and the views tell the metrics; the only writer of them."""

    def __init__(self, label_cap):
        self.cap = label_cap
        self._children = {}

    def _child(self, metric, *labels):
        """Return the metric's child for these labels, looked up once (``labels`` locks)."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[metric, labels] = metric.labels(*labels)
        return child

    def http_request(self, method, endpoint, status, seconds):
        self._child(REQUESTS, method, endpoint, str(status)).inc()
        self._child(REQUEST_LATENCY, method, endpoint).observe(seconds)

    def llm_success(self, entry, streaming, seconds):
        model = self.cap(entry.model)
        self._child(LLM_REQUESTS, entry.provider, model,
                    "true" if streaming else "false").inc()
        self._child(LLM_LATENCY, entry.provider, model).observe(seconds)

    def llm_error(self, entry, asked, reason):
        # Error-side metrics carry what the caller asked for.
        self._child(LLM_ERRORS, entry.provider, self.cap(asked), reason).inc()

    def tokens(self, entry, usage, caller=None):
        """Count reported tokens; ``caller`` (the request's ``g.caller``) is charged too."""
        if not isinstance(usage, dict):
            return
        model = self.cap(entry.model)
        counts = {}
        for kind, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            count = usage.get(key)
            # Upstreams report what they like; count only real numbers.
            if isinstance(count, (int, float)) and not isinstance(count, bool) \
                    and 0 < count < 1e9:
                self._child(TOKENS, entry.provider, model, kind).inc(count)
                counts[kind] = count
        if caller is not None and counts:
            caller.spend(entry, counts.get("prompt", 0), counts.get("completion", 0))

    def chain_done(self, attempts, entries, alias, served):
        """Record the walk: every entry moved past, and which entry served an alias."""
        for attempt in attempts:
            following = attempt.index + 1
            to_model = entries[following].label if following < len(entries) else ""
            self._child(FALLBACKS, self.cap(attempt.model), self.cap(to_model),
                        attempt.reason).inc()
        if alias is not None and served is not None:
            self._child(ALIAS_RESOLVED, alias, served.label).inc()

    def provider_health(self, provider, healthy):
        PROVIDER_HEALTHY.labels(provider).set(1 if healthy else 0)

    def provider_inflight(self, provider, delta):
        self._child(PROVIDER_INFLIGHT, provider).inc(delta)

    def shared_state_up(self, up):
        SHARED_STATE_UP.set(1 if up else 0)

    def caller_request(self, caller, status):
        self._child(CALLER_REQUESTS, caller, str(status)).inc()

    def caller_tokens(self, caller, provider, prompt, completion, cost):
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if count:
                self._child(CALLER_TOKENS, caller, provider, kind).inc(count)
        cost_child = self._child(COST, caller, provider)
        if cost:  # the series exists from the first call on; a free call writes nothing
            cost_child.inc(cost)

    def quota_rejected(self, caller, limit):
        self._child(QUOTA_REJECTIONS, caller, limit).inc()

    def cache_result(self, result):
        self._child(CACHE_REQUESTS, result).inc()

    def cache_bytes(self, store, size):
        self._child(CACHE_BYTES, store).set(size)

    def cache_saved(self, provider, prompt, completion, cost):
        """Count what a hit saved: the original answer's tokens and their price."""
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if count:
                self._child(CACHE_SAVED_TOKENS, provider, kind).inc(count)
        self._child(CACHE_SAVED_COST, provider).inc(cost)


def render():
    """Return ``(body, content_type)`` of the exposition, aggregated over workers."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        # Never read while the master folds a dead worker's files into the archive.
        with directory_lock(directory, exclusive=False):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        from prometheus_client import REGISTRY as registry
    return generate_latest(registry), CONTENT_TYPE_LATEST


# Callers (the key file bounds the caller label).
CALLER_REQUESTS = Counter("mana_llm_caller_requests_total", "HTTP requests per caller",
                          ["caller", "status"])
CALLER_TOKENS = Counter("mana_llm_caller_tokens_total",
                        "Tokens reported by upstreams per caller", ["caller", "provider", "type"])
COST = Counter("mana_llm_cost_usd", "What callers' calls cost, from prices.yaml (USD)",
               ["caller", "provider"])
QUOTA_REJECTIONS = Counter("mana_llm_quota_rejections_total",
                           "Requests refused because a caller was over a limit",
                           ["caller", "limit"])

# Response cache (labels are fixed sets, or providers).
CACHE_REQUESTS = Counter("mana_llm_cache_requests_total",
                         "Cacheable requests by what the cache did (hit, miss, bypass, "
                         "store_error)", ["result"])
# livemax: store="worker" is the fullest worker's LRU, store="board" the
# board's own total as the last worker to write it saw it.
CACHE_BYTES = Gauge("mana_llm_cache_bytes", "Bytes of cached answers, per store",
                    ["store"], multiprocess_mode="livemax")
CACHE_SAVED_TOKENS = Counter("mana_llm_cache_saved_tokens_total",
                             "Tokens of the original answers that cache hits served again",
                             ["provider", "type"])
CACHE_SAVED_COST = Counter("mana_llm_cache_saved_usd",
                           "What cache hits would have cost upstream, from prices.yaml (USD)",
                           ["provider"])
