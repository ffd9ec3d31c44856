"""SSE both ways: reading upstream streams, framing ours, and the committed stream.

Reading: ``split_lines`` turns the bytes of a streamed answer into lines
(cost linear in bytes, a line bounded), ``sse_data`` turns SSE lines into
events. Writing: ``sse_event``, ``error_event``, ``DONE``.

The walk commits to a provider only when its stream has produced a chunk
with content (text, a tool call or a finish reason, see ``prime``): until
then any failure falls back to the next entry and the caller's response
has not started, so a chain that fails entirely still gets a proper JSON
error. From then on the stream is a ``CommittedStream``: it records its
own outcome and closes its upstream when it ends.
"""

import json
import logging

from app import errors
from app.shapes import has_content

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# An SSE or NDJSON line longer than this is a broken upstream, not an answer.
MAX_LINE = 1024 * 1024
# What may be held back (as JSON) before a stream's first chunk with content.
MAX_HEAD = 1024 * 1024


# -- reading ---------------------------------------------------------------------------

def split_lines(chunks, label, max_line=MAX_LINE):
    """Yield the lines (bytes, without line endings) of a stream of byte chunks."""
    pending = bytearray()
    for data in chunks:
        scan = len(pending)  # what is pending holds no newline: search only the new bytes
        pending += data
        start = 0
        while (end := pending.find(b"\n", scan)) >= 0:
            yield bytes(pending[start:end]).rstrip(b"\r")
            start = scan = end + 1
        if start:
            del pending[:start]
        if len(pending) > max_line:
            raise errors.UpstreamError(f"{label}: stream line longer than {max_line} bytes",
                                       reason="malformed-response")
    if pending.strip():
        yield bytes(pending).rstrip(b"\r")


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads_upstream(data):
    """Decode an upstream's JSON; NaN and Infinity (not JSON) raise ValueError.

    Passed on, they would reach callers in bodies that strict parsers
    (JavaScript's JSON.parse) reject.
    """
    return json.loads(data, parse_constant=_no_constant)


def sse_data(lines, label):
    """Yield the decoded JSON of each ``data:`` event; stop at ``[DONE]``."""
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        if not payload:
            continue
        try:
            yield loads_upstream(payload)
        except ValueError:
            raise errors.UpstreamError(f"{label}: malformed event in upstream stream",
                                       reason="malformed-response") from None


def check_event(event, label):
    """Raise for a stream event that is not an object or that reports an upstream error."""
    if not isinstance(event, dict):
        raise errors.UpstreamError(f"{label}: malformed stream event",
                                   reason="malformed-response")
    if event.get("error") is not None:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise errors.UpstreamError(f"{label}: error in stream: {message}",
                                   reason="stream-error")


# -- writing ---------------------------------------------------------------------------

def sse_event(obj):
    """Return one SSE ``data:`` event for a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def error_event(error):
    """Return the SSE event that reports a failure after the stream started."""
    return sse_event({"error": {"message": error.message, "type": error.kind,
                                "code": error.kind}})


# -- committing ------------------------------------------------------------------------

class PrimedStream:
    """An upstream stream read up to its first chunk with content."""

    def __init__(self, head, rest):
        self.head = head    # chunks already read, the last one has content
        self.rest = rest    # the generator for the remainder

    def close(self):
        self.rest.close()


def prime(chunks, max_head=MAX_HEAD):
    """Read ``chunks`` until one has content; return a PrimedStream or raise.

    What comes before it is held back, so it is bounded: an upstream that
    sends endless empty events fails this entry instead of growing the
    worker. (The wait for it is bounded too: the call's deadline, set by
    the transport, is enforced while the walk is priming.)
    """
    head, size = [], 0
    try:
        for chunk in chunks:
            head.append(chunk)
            if has_content(chunk):
                return PrimedStream(head, chunks)
            size += len(json.dumps(chunk, separators=(",", ":")))
            if size > max_head:
                raise errors.UpstreamError(
                    f"upstream stream sent over {max_head} bytes before any content",
                    reason="malformed-response")
    except BaseException:
        chunks.close()
        raise
    chunks.close()
    raise errors.UpstreamError("upstream stream ended before any content",
                               reason="closed-early")


class CommittedStream:
    """The stream the walk committed to: its chunks, its own books, its upstream closed.

    Iterating yields the chunks; a clean end is a success of the entry, a
    ``GatewayError`` after commit is a failure counted against it (and
    raised on, so the view can tell the caller), and either way, or when
    the caller leaves, the upstream is closed. ``settle(error_or_None)``
    is the walker's bookkeeping for the entry; ``recorder`` counts tokens
    (charged to ``payer``, the request's caller, when there is one);
    ``on_close()`` is called once when the stream is done.
    """

    def __init__(self, primed, entry, settle, recorder, on_close=None, payer=None):
        self.entry = entry
        self._payer = payer
        self._primed = primed
        self._settle = settle
        self._recorder = recorder
        self._on_close = on_close
        self._chunks = self._relay()

    def __iter__(self):
        return self._chunks

    def _relay(self):
        try:
            for part in (self._primed.head, self._primed.rest):
                for chunk in part:
                    if chunk.get("usage"):
                        self._recorder.tokens(self.entry, chunk["usage"], self._payer)
                    yield chunk
        except errors.GatewayError as error:
            # Committed: never splice in another provider; the view tells the caller.
            log.warning("stream from %s failed after it started: %s", self.entry.label,
                        error.message)
            self._settle(error)
            raise
        else:
            self._settle(None)
        finally:
            self._end()

    def close(self):
        """Close the upstream (at once if the stream is still running)."""
        self._chunks.close()
        self._end()

    def _end(self):
        self._primed.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
