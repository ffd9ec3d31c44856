"""The Provider base class: send a translated body, classify the answer, guard the edge.

A provider is translation plus a thin transport (``transport.py``). Its
public methods translate the caller's request first (a request that
cannot be translated is the caller's 400, raised before anything goes
upstream), then send it and read the answer inside ``edge``: there an
answer we cannot read becomes ``malformed-response`` and upstream text
is redacted, once, before it goes anywhere. Status classification is a
method, so a provider with its own conventions overrides a piece of it.
"""

import email.utils
import json
import logging
import math
import time
from contextlib import contextmanager

from app import errors
from app.providers.transport import Reply
from app.streaming import loads_upstream

log = logging.getLogger(__name__)

# What reading an upstream answer of a shape we did not expect raises. The
# JSON parser raises RecursionError, not ValueError, for nesting deeper than
# it recurses: an upstream can send that, so it is the upstream's failure.
READING_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError,
                  RecursionError)
# How much of an error message is kept (after redaction), and how much of an
# upstream's text is looked at before it (a few times more: redaction sees whole keys).
MESSAGE_LENGTH = 600
_MESSAGE_WINDOW = 4 * MESSAGE_LENGTH
# Decoded JSON costs memory per object and array, not per byte: 31 MiB of
# "{}," (under the transport's size limit) is ten million dicts, 1.7 GB for
# three such answers at once. Real answers have far fewer: logprobs of 4,096
# tokens with 20 alternatives each are about 180,000.
MAX_CONTAINERS = 500_000
# Inputs per upstream embeddings call: 256 vectors of 3,072 dimensions are
# about 15 MB of JSON, so a request of the most inputs the gateway takes
# (2,048) never meets the answer size limit and trips a healthy provider.
EMBED_BATCH = 256


def in_batches(items, size):
    """Yield consecutive slices of ``items`` of at most ``size`` each."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Provider:
    """Base of the provider adapters; subclasses translate, the transport sends."""

    def __init__(self, name, transport, *, redactor, configured=True,
                 stream_idle_timeout=60.0, cooldown=15.0):
        self.name = name
        self.transport = transport
        self.redactor = redactor
        self.configured = configured
        self.stream_idle_timeout = stream_idle_timeout
        self.cooldown = cooldown

    def check_capabilities(self, body, model):
        """Raise CapabilityError if ``model`` cannot serve ``body``."""

    def chat(self, body, model, call=None):
        """Return an OpenAI ``chat.completion`` dict for ``body``."""
        raise NotImplementedError

    def stream_chat(self, body, model, call=None):
        """Return a generator of ``chat.completion.chunk`` dicts; close() closes upstream."""
        raise NotImplementedError

    #: Inputs per upstream embeddings call.
    embed_batch = EMBED_BATCH

    def embed(self, inputs, model, body, call=None):
        """Return ``(vectors, prompt_tokens)`` for a list of strings, a batch per call."""
        vectors, tokens = [], 0
        for batch in in_batches(inputs, self.embed_batch):
            found, used = self.embed_one_batch(batch, model, body, call)
            vectors.extend(found)
            tokens += used
        return vectors, tokens

    def embed_one_batch(self, inputs, model, body, call):
        """Return ``(vectors, prompt_tokens)`` of one upstream call."""
        raise NotImplementedError

    def list_models(self, timeout=None):
        """Return the model names the upstream serves (``timeout`` bounds the call)."""
        raise NotImplementedError

    def probe(self, timeout):
        """Raise an UpstreamError unless the upstream answers below 500."""
        raise NotImplementedError

    def close(self):
        """Close pooled connections."""
        self.transport.close()

    # -- the edge ------------------------------------------------------------------------

    @contextmanager
    def edge(self, label):
        """Make every failure inside ours: redacted, and a misshapen answer malformed."""
        try:
            yield
        except errors.GatewayError as error:
            # Redacted before it is cut short, so a key straddling the cut cannot leak.
            error.message = self.redactor.redact(error.message)[:MESSAGE_LENGTH]
            raise
        except READING_ERRORS as exc:
            log.warning("malformed answer from %s (%s)", label, type(exc).__name__)
            raise errors.UpstreamError(f"{label}: malformed answer ({type(exc).__name__})",
                                       reason="malformed-response") from None

    def send_json(self, method, path, payload=None, *, call=None, model="", timeout=None,
                  params=None):
        """Send ``payload`` and return the decoded JSON answer, or raise our error."""
        reply = self.transport.fetch(method, path, encode(payload), call=call,
                                     timeout=timeout, params=params)
        if reply.status >= 300:
            raise self.error_for_status(reply, model)
        if too_many_containers(reply.body):
            raise errors.UpstreamError(
                f"{self.name}/{model}: answer has over {MAX_CONTAINERS} JSON objects and arrays",
                reason="too-large")
        try:
            return loads_upstream(reply.body)
        except ValueError:
            raise errors.UpstreamError(f"{self.name}/{model}: malformed JSON answer",
                                       reason="malformed-response") from None

    def open_stream(self, path, payload, *, call=None, model, params=None):
        """Start a streamed request: the ``UpstreamStream``, or our error for an error answer.

        The caller reads ``split_lines(stream.chunks(), label)``, sets
        ``stream.finished`` once the upstream sent its last event (so the
        connection is kept) and closes the stream.
        """
        stream = self.transport.open_stream(path, encode(payload), call=call, params=params,
                                            idle_timeout=self.stream_idle_timeout)
        if isinstance(stream, Reply):
            raise self.error_for_status(stream, model)
        return stream

    def probe_path(self, path, timeout):
        """Raise an UpstreamError unless ``path`` answers below 500 within ``timeout``."""
        with self.edge(self.name):
            reply = self.transport.fetch("GET", path, timeout=timeout)
        if reply.status >= 500:
            raise errors.UpstreamError(f"{self.name}: probe got HTTP {reply.status}",
                                       reason=f"HTTP {reply.status}")

    # -- status classification ------------------------------------------------------------

    def error_for_status(self, reply, model):
        """Return the error for an upstream answer with status >= 300.

        The error's class then says whether the walk trips, moves on or
        stops; ``edge`` redacts the upstream's text in it.
        """
        status, text = reply.status, _as_text(reply.body)
        message = upstream_message(text)
        where = f"{self.name}/{model}"
        if status == 429:
            wait = parse_retry_after(reply.headers.get("Retry-After"), None)
            if wait is None:
                wait = self.retry_delay(text)
            return errors.RateLimited(f"{where} is rate-limited: {message}",
                                      retry_after=self.cooldown if wait is None else wait)
        if self.refuses_credentials(status, text):
            return errors.UpstreamAuthError(
                f"{self.name} refused the gateway's credentials ({status}): {message}")
        if status == 404:
            return errors.UpstreamModelNotFound(f"{where} not found upstream: {message}")
        if status < 400:
            return errors.UpstreamError(f"{self.name}: unexpected redirect ({status})",
                                        reason=f"HTTP {status}")
        if status == 408 or status >= 500:
            return errors.UpstreamError(f"{where} failed with HTTP {status}: {message}",
                                        reason=f"HTTP {status}")
        return errors.UpstreamInvalidRequest(message, reason=f"HTTP {status}")

    def refuses_credentials(self, status, text):
        """Tell whether an error answer means the gateway's own key was refused."""
        return status in (401, 403)

    def retry_delay(self, text):
        """Return the wait an error body asks for (seconds), or None."""
        return None


def encode(payload):
    """Return the JSON bytes of a request body (None for none)."""
    if payload is None:
        return None
    return json.dumps(payload, separators=(",", ":")).encode()


def parse_retry_after(value, default, now=None):
    """Return seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if not value:
        return default
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), errors.MAX_RETRY_AFTER) if math.isfinite(seconds) \
            else default
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return default
    if when is None:
        return default
    now = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - now), errors.MAX_RETRY_AFTER)


def too_many_containers(raw):
    """Tell whether JSON text (bytes or str) may hold more objects and arrays than we decode."""
    opening = ("{", "[") if isinstance(raw, str) else (b"{", b"[")
    return raw.count(opening[0]) + raw.count(opening[1]) > MAX_CONTAINERS


def _as_text(raw):
    return raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)


def upstream_message(text):
    """Return the human message of an upstream error body (any provider's shape)."""
    try:
        if too_many_containers(text):
            raise ValueError("too big to decode")
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()[:_MESSAGE_WINDOW] or "no message"
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail", doc))
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:_MESSAGE_WINDOW]
        if isinstance(err, str):
            return err[:_MESSAGE_WINDOW]
    return text.strip()[:_MESSAGE_WINDOW]
