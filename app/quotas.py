"""Callers' quotas and usage, counted on the shared board; one request's tab.

Windows are fixed: the current UTC minute and the current UTC day. Per
caller and window the board keeps two counters (requests, tokens), each
key named for its window and expiring with it. A caller with limits
costs one board op when admitted (count the request, read the tokens).
What a response used (tokens; the request itself for a caller without
limits) is added up in the worker and put on the board by a background
flush once a second, in one op for all callers: a request of a caller
without limits never waits for the board, and token counts reach the
board (and other workers' admissions) within about a second.

A board that is down (or ``SHARED_STATE_URL=memory``) never blocks a
caller: each worker then counts alone, at an equal share of each limit
(limit / workers, at least 1).
"""

import atexit
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

from app import errors
from app.routing.board import MemoryBoard

log = logging.getLogger(__name__)

WINDOWS = (("minute", 60), ("day", 86400))
FLUSH_EVERY = 1.0  # seconds between puts of the worker's pending counts on the board
# Which counter each limit bounds.
LIMITED = {"requests_per_minute": ("minute", "requests"),
           "tokens_per_minute": ("minute", "tokens"),
           "tokens_per_day": ("day", "tokens")}


def window_ends(now):
    """Return ``{window: (index, end)}`` for a wall-clock time."""
    return {name: (int(now // size), (int(now // size) + 1) * size) for name, size in WINDOWS}


def counter_key(caller, window, index, what):
    return f"{caller}:{window}:{index}:{what}"


class Quotas:
    """Admit callers against their limits and count what they used."""

    def __init__(self, board, *, workers=None, wall=time.time, recorder=None):
        self.board = board  # a GuardedBoard, or None: per worker only
        self.workers = max(1, workers or 1)
        self.local = MemoryBoard(wall=wall)
        self._wall = wall
        self._recorder = recorder
        self._lock = threading.Lock()
        self._pending = {}
        self._flusher_pid = None

    def _add(self, counts):
        """Return ``(values, shared)``: on the board, or this worker's own when it is away."""
        # The quotas' board is their own: nothing else tries it again once down.
        if self.board is not None and self.board.reconnect():
            values = self.board.add(counts)
            if values is not None:
                return values, True
        return self.local.add(counts), False

    def _counts(self, name, now, requests=0, tokens=0):
        counts = {}
        for window, (index, end) in window_ends(now).items():
            counts[counter_key(name, window, index, "requests")] = (requests, end)
            counts[counter_key(name, window, index, "tokens")] = (tokens, end)
        return counts

    def admit(self, caller):
        """Count one request of a caller with limits, or raise QuotaExceeded."""
        if not caller.limits:
            return False
        now = self._wall()
        counts = self._counts(caller.name, now, requests=1)
        values, shared = self._add(counts)
        ends = window_ends(now)
        for limit, (window, what) in LIMITED.items():
            cap = caller.limits.get(limit)
            if cap is None:
                continue
            if not shared:
                cap = max(1, cap // self.workers)
            index, end = ends[window]
            used = values[counter_key(caller.name, window, index, what)]
            # This request is in the request count; tokens come after it.
            if used > cap if what == "requests" else used >= cap:
                self._add({k: (-1, until) for k, (n, until) in counts.items() if n})
                if self._recorder is not None:
                    self._recorder.quota_rejected(caller.name, limit)
                raise errors.QuotaExceeded(
                    f"caller {caller.name!r} is over its {limit} ({caller.limits[limit]})",
                    limit=limit, retry_after=max(1, math.ceil(end - now)))
        return True

    def settle(self, name, counted, tokens):
        """Count a finished request (unless admitted already) and its tokens, for the flush."""
        if counted and not tokens:
            return
        counts = self._counts(name, self._wall(), requests=0 if counted else 1, tokens=tokens)
        with self._lock:
            for key, (amount, until) in counts.items():
                if amount:
                    self._pending[key] = (self._pending.get(key, (0, until))[0] + amount,
                                          until)
        self._start_flusher()

    def flush(self):
        """Put the pending counts on the board (or this worker's own while it is away)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            self._add(pending)

    def _start_flusher(self):
        # Started by the first settle in each process: threads do not survive a fork.
        if self._flusher_pid == os.getpid():
            return
        with self._lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_forever, name="mana-llm-usage-flush",
                         daemon=True).start()
        atexit.register(self.flush)  # a worker replaced on HUP leaves nothing behind

    def _flush_forever(self):
        while True:
            time.sleep(FLUSH_EVERY)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the flusher must outlive any one failure
                log.exception("putting callers' usage on the board failed")

    def usage(self, callers):
        """Return each caller's usage of the current minute and day, and its limits."""
        self.flush()  # this worker's own counts; others' arrive within FLUSH_EVERY
        now = self._wall()
        counts = {}
        for caller in callers:
            counts.update(self._counts(caller.name, now))
        values, shared = self._add(counts) if counts else ({}, True)
        out = []
        for caller in callers:
            entry = {"caller": caller.name, "limits": dict(caller.limits), "shared": shared}
            for window, (index, end) in window_ends(now).items():
                entry[window] = {
                    what: values[counter_key(caller.name, window, index, what)]
                    for what in ("requests", "tokens")}
                entry[window]["resets_in"] = max(1, math.ceil(end - now))
            out.append(entry)
        return out


def workers_from(environ=None):
    """Return gunicorn's worker count (WEB_CONCURRENCY), 1 when unknown."""
    value = (os.environ if environ is None else environ).get("WEB_CONCURRENCY", "1")
    return int(value) if value.strip().isdigit() and int(value) > 0 else 1


@dataclass
class Tab:
    """One request's account for its caller: ``g.caller`` in a view."""

    caller: object
    quotas: Quotas
    recorder: object
    prices: object
    counted: bool = False   # admitted with limits: the board has its request
    admitted: bool = False
    tokens: int = 0

    @property
    def name(self):
        return self.caller.name

    def admit(self, model):
        """Check the model against the caller's globs, then its quotas (before any upstream)."""
        self.caller.require_model(model)
        self.counted = self.quotas.admit(self.caller)
        self.admitted = True

    def spend(self, entry, prompt, completion):
        """Count tokens an upstream reported for this caller, and what they cost."""
        cost = self.prices.cost(entry.provider, entry.model, prompt, completion)
        self.recorder.caller_tokens(self.name, entry.provider, prompt, completion, cost)
        self.tokens += int(prompt + completion)

    def close(self):
        """Put the request's count and tokens on the board (after the response is done)."""
        if self.admitted:
            self.quotas.settle(self.name, self.counted, self.tokens)


@dataclass(frozen=True)
class CallerBook:
    """A worker's callers, their quotas and the prices: what auth and /v1/usage need."""

    table: object
    quotas: Quotas
    prices: object
    recorder: object
