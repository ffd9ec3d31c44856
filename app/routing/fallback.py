"""The chain walk: try each entry of a resolved route until one answers.

Plain chat, streamed chat (until the first chunk with content) and
embeddings all go through ``ChainWalker.walk``. What a failure means for
the walk is a fact of the error's class (``on_failure`` in
``app.errors``), so the classification lives in one place. The walk
sees only our errors: providers translate every other failure at their
edge, so anything else is a bug of ours, which reaches the caller as a
500 and says nothing about a provider's health.
"""

import functools
import logging
import time
import weakref
from dataclasses import dataclass

from app import errors
from app.providers.inflight import caller_left
from app.streaming import CommittedStream

log = logging.getLogger(__name__)

# What a caller turned away by a full provider is told: slots free up as calls end.
SATURATED_RETRY_AFTER = 1.0


@dataclass
class Attempt:
    """One entry the walk moved past, and why."""

    model: str
    reason: str
    index: int
    made: bool = False          # True when a call actually went upstream
    retry_after: float = None   # seconds until it may be tried again, when known

    def public(self):
        return {"model": self.model, "reason": self.reason}


@dataclass
class Outcome:
    """What the walk produced: the entry that answered, its result and the timing."""

    entry: object
    result: object
    attempts: list
    upstream_seconds: float


class ChainWalker:
    """Walk routes with the health cache, the calls-in-flight registry and the recorder."""

    def __init__(self, providers, health, inflight, recorder, capacity=None):
        self._providers = providers
        self._health = health
        self._inflight = inflight
        self._recorder = recorder
        self._capacity = capacity   # app.routing.capacity.Capacity, or None: no caps

    def walk(self, route, ask, *, streaming=False, client=None, payer=None, can_serve=None):
        """Return the Outcome of the first entry whose ``ask(provider, entry, call)`` succeeds.

        ``call`` is the in-flight registration to pass down to the
        transport. With ``streaming``, ``ask`` returns a primed stream and
        the result is a ``CommittedStream`` that keeps its own books (its
        tokens charged to ``payer``, the request's caller); if the ``client``
        socket closes while the stream runs, its call is aborted; one that closes
        while the call waits for a slot of a capped provider ends the wait.
        ``can_serve(provider, model)`` tells, before any call, whether an entry
        could take this request (it decides which entry is the last eligible
        one, which waits for a slot of a capped provider instead of skipping).
        """
        attempts = []
        served = None
        refused = []    # CapabilityErrors of entries that cannot serve this request
        try:
            for index, entry in enumerate(route.entries):
                provider = self._providers.get(entry.provider)
                if provider is None or not provider.configured:
                    attempts.append(Attempt(entry.label, "unconfigured", index))
                    continue
                if not self._health.admit(entry.provider):
                    wait = self._health.retry_after(entry.provider)
                    attempts.append(Attempt(entry.label, "cache-unhealthy", index,
                                            retry_after=wait))
                    continue
                slot = self._claim(route, index, can_serve, client)
                if slot is None:
                    self._health.release(entry.provider)  # a trial admitted above goes unused
                    attempts.append(Attempt(entry.label, "saturated", index,
                                            retry_after=SATURATED_RETRY_AFTER))
                    continue
                try:
                    outcome = self._try(provider, entry, ask, attempts, index, route.asked,
                                        streaming, (client, payer), slot)
                except errors.CapabilityError as error:
                    if route.alias is None:
                        raise
                    # In an alias, an entry that cannot serve this request is
                    # skipped; a later one may (another model, URLs allowed).
                    refused.append(error)
                    attempts.append(Attempt(entry.label, error.reason, index))
                    continue
                if outcome is not None:
                    served = entry
                    return outcome
            raise exhausted(attempts, route.asked, refused)
        finally:
            self._recorder.chain_done(attempts, route.entries, route.alias, served)

    def _claim(self, route, index, can_serve, client=None):
        """Return the entry's slot (waiting if it is the last eligible one), None if full.

        A caller who leaves while it waits gives its place up: otherwise each
        caller that timed out in the queue (and its SDK's retries) would later
        take a slot and run a whole generation that nobody reads.
        """
        if self._capacity is None:
            return _NO_SLOT
        provider = route.entries[index].provider
        slot = self._capacity.claim(provider)
        if slot is None and (route.alias is None or self._last_eligible(route, index, can_serve)):
            gone = functools.partial(caller_left, client) if client is not None else None
            slot = self._capacity.claim(provider, wait=self._capacity.queue_timeout, gone=gone)
        return slot

    def _last_eligible(self, route, index, can_serve):
        """Tell whether no later entry is configured, untripped and able to serve the request."""
        for entry in route.entries[index + 1:]:
            provider = self._providers.get(entry.provider)
            if provider is None or not provider.configured:
                continue
            if self._health.is_tripped(entry.provider) or self._health.in_backoff(entry.provider):
                continue
            if can_serve is None or can_serve(provider, entry.model):
                return False
        return True

    def _try(self, provider, entry, ask, attempts, index, asked, streaming, party, slot):
        """Call one entry; return its Outcome, or None to move on. Its slot goes back here
        unless a committed stream took it (that gives it back when it ends)."""
        try:
            outcome, slot = self._call(provider, entry, ask, attempts, index, asked, streaming,
                                       party, slot)
        finally:
            self._release(slot)
        return outcome

    def _call(self, provider, entry, ask, attempts, index, asked, streaming, party, slot):
        started = time.perf_counter()
        call = self._inflight.begin(entry.provider)
        try:
            try:
                result = ask(provider, entry, call)
            finally:
                # Before the failure is recorded: a trip aborts the calls still in flight.
                self._inflight.end(call)
        except errors.GatewayError as error:
            self._record_failure(entry, error, asked)
            if error.on_failure == "stop":
                raise
            attempts.append(Attempt(entry.label, error.reason, index, made=True,
                                    retry_after=getattr(error, "retry_after", None)))
            return None, slot
        except BaseException:
            # A bug of ours (or the caller leaving) says nothing about the
            # provider: record nothing, but end a half-open trial.
            self._health.release(entry.provider)
            raise
        seconds = time.perf_counter() - started
        if streaming:
            # A first chunk is not yet a good answer: the stream counts as a
            # success when it ends cleanly, so a provider that breaks every
            # stream mid-way still trips.
            self._health.release(entry.provider)
            result = self._commit(result, entry, asked, call, party, slot)
            slot = _NO_SLOT   # the stream holds it until it ends
        else:
            self._health.record_success(entry.provider)
        self._recorder.llm_success(entry, streaming, seconds)
        return Outcome(entry, result, attempts, seconds), slot

    def _commit(self, primed, entry, asked, call, party, slot):
        """Return the CommittedStream for a primed stream; watch its client, if known.

        The stream gives its slot back when it ends, however it ends.
        """
        client, payer = party
        done = [functools.partial(self._release, slot)]
        if client is not None:
            self._inflight.watch(call, client)
            done.append(functools.partial(self._inflight.unwatch, call))
        settle = functools.partial(self._settle_stream, entry, asked)
        stream = CommittedStream(primed, entry, settle, self._recorder,
                                 functools.partial(_run_all, done), payer)
        if slot is not _NO_SLOT:
            # A stream dropped unread (its response never iterated, so never
            # closed) still gives its slot back; a second release is ignored.
            weakref.finalize(stream, self._release, slot)
        return stream

    def _release(self, slot):
        if slot is not _NO_SLOT:
            self._capacity.release(slot)

    def _record_failure(self, entry, error, asked):
        """Tell the log, the metrics and the health cache what a failed call says."""
        # The reason code alone (in attempts and metrics) cannot tell two
        # failures apart; the message can (already redacted at the edge).
        log.info("%s failed (%s): %s", entry.label, error.reason, error.message)
        self._recorder.llm_error(entry, asked, error.reason)
        if error.on_failure == "trip":
            self._health.record_failure(entry.provider, error.message)
        elif error.on_failure == "cooldown":
            self._health.record_rate_limit(entry.provider, error.retry_after)
        else:
            self._health.release(entry.provider)

    def _settle_stream(self, entry, asked, error):
        """Record how a committed stream ended: cleanly (None) or with ``error``."""
        if error is None:
            self._health.record_success(entry.provider)
        else:
            self._record_failure(entry, error, asked)


# The slot of a walk without caps (no Capacity), or one already handed to a stream.
_NO_SLOT = object()


def _run_all(actions):
    for action in actions:
        action()


def exhausted(attempts, asked, refused=()):
    """Return the error for a chain whose every entry was skipped or failed."""
    if refused and all(a.reason in ("capability", "unconfigured") for a in attempts):
        return refused[0]   # no entry could serve it: the caller must change the request
    made = [a for a in attempts if a.made]
    public = [a.public() for a in attempts]
    if made and all(a.reason == errors.UpstreamModelNotFound.reason for a in made):
        return errors.ModelNotFound(
            f"no provider of {asked!r} has the model: " + _summary(attempts), param="model")
    waits = [a.retry_after for a in attempts if a.retry_after is not None]
    retry_after = min(waits) if waits else None
    if made and all(a.reason == errors.RateLimited.reason for a in made):
        return errors.ChainRateLimited(
            f"every provider tried for {asked!r} is rate-limiting: " + _summary(attempts),
            attempts=public, retry_after=retry_after)
    return errors.ChainExhausted(
        f"no healthy provider for {asked!r}: " + _summary(attempts),
        attempts=public, retry_after=retry_after)


def _summary(attempts):
    return "; ".join(f"{a.model}: {a.reason}" for a in attempts) or "empty chain"
