"""The chain walk: try each entry of a resolved chain until one answers.

Plain chat, streamed chat (until the first chunk with content) and
embeddings all go through ``ChainWalker.walk``. What a failure means for
the walk is a fact of the error's class (``on_failure`` in
``app.errors``), so the classification lives in one place.
"""

import logging
import time
from dataclasses import dataclass

from app import errors

log = logging.getLogger(__name__)

# What translating an answer of a shape we did not expect raises.
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def misshapen(entry, exc):
    """Return the retryable error for an upstream answer the translation choked on."""
    # Logged with its traceback: it may also be a bug of ours.
    log.warning("unexpected answer shape from %s", entry.label, exc_info=True)
    return errors.UpstreamError(f"{entry.label}: malformed answer ({type(exc).__name__})",
                                reason="malformed-response")


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
    """Walk chains with the health cache, the calls-in-flight registry and the recorder."""

    def __init__(self, providers, health, inflight, recorder, redactor):
        self._providers = providers
        self._health = health
        self._inflight = inflight
        self._recorder = recorder
        self._redactor = redactor

    def walk(self, entries, call, *, asked, alias=None, streaming=False):
        """Return the Outcome of the first entry whose ``call(provider, entry)`` succeeds."""
        attempts = []
        served = None
        try:
            for index, entry in enumerate(entries):
                provider = self._providers.get(entry.provider)
                if provider is None or not provider.configured:
                    attempts.append(Attempt(entry.label, "unconfigured", index))
                    continue
                if not self._health.admit(entry.provider):
                    wait = self._health.retry_after(entry.provider)
                    attempts.append(Attempt(entry.label, "cache-unhealthy", index,
                                            retry_after=wait))
                    continue
                outcome = self._try(provider, entry, call, attempts, index, asked,
                                    streaming)
                if outcome is not None:
                    served = entry
                    return outcome
            raise exhausted(attempts, asked)
        finally:
            self._recorder.chain_done(attempts, entries, alias, served)

    def _try(self, provider, entry, call, attempts, index, asked, streaming):
        started = time.perf_counter()
        in_flight = self._inflight.begin(entry.provider)
        try:
            result = call(provider, entry)
        except errors.GatewayError as error:
            failure = error
        except SHAPE_ERRORS as exc:
            failure = misshapen(entry, exc)
        else:
            failure = None
        finally:
            # Before the failure is recorded: a trip aborts the calls still in flight.
            self._inflight.end(in_flight)
        if failure is not None:
            return self._failed(entry, failure, attempts, index, asked, streaming)
        seconds = time.perf_counter() - started
        if streaming:
            # A first chunk is not yet a good answer: the stream counts as a
            # success when it ends cleanly (record_stream_success), so a
            # provider that breaks every stream mid-way still trips.
            self._health.release(entry.provider)
        else:
            self._health.record_success(entry.provider)
        self._recorder.llm_success(entry, streaming, seconds)
        return Outcome(entry, result, attempts, seconds)

    def _failed(self, entry, error, attempts, index, asked, streaming):
        """Record a failed call; raise it if it stops the walk, else note the attempt."""
        # Upstream text can echo our key: clean it before anything keeps it.
        error.message = self._redactor.redact(error.message)
        self._recorder.llm_error(entry, asked, error.reason, streaming)
        self._note_failure(entry, error)
        if error.on_failure == "stop":
            raise error
        attempts.append(Attempt(entry.label, error.reason, index, made=True,
                                retry_after=getattr(error, "retry_after", None)))
        return None

    def _note_failure(self, entry, error):
        """Tell the health cache what a failed call says about the provider."""
        if error.on_failure == "trip":
            self._health.record_failure(entry.provider, error.message)
        elif error.on_failure == "cooldown":
            self._health.record_rate_limit(entry.provider, error.retry_after)
        else:
            self._health.release(entry.provider)

    def record_stream_success(self, entry):
        """Mark the provider healthy: its committed stream ended cleanly."""
        self._health.record_success(entry.provider)

    def record_stream_failure(self, entry, error, asked):
        """Count a failure after a stream was committed against its provider."""
        error.message = self._redactor.redact(error.message)
        self._recorder.llm_error(entry, asked, error.reason, True)
        self._note_failure(entry, error)


def exhausted(attempts, asked):
    """Return the error for a chain whose every entry was skipped or failed."""
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
