"""SSE framing, and priming an upstream stream until its first real chunk.

The walk commits to a provider only when its stream has produced a chunk
with content (text, a tool call or a finish reason): until then any
failure falls back to the next entry and the caller's response has not
started, so a chain that fails entirely still gets a proper JSON error.
"""

import json

from app import errors
from app.shapes import has_content

DONE = b"data: [DONE]\n\n"


def sse_event(obj):
    """Return one SSE ``data:`` event for a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def error_event(error):
    """Return the SSE event that reports a failure after the stream started."""
    return sse_event({"error": {"message": error.message, "type": error.kind,
                                "code": error.kind}})


class PrimedStream:
    """An upstream stream read up to its first chunk with content."""

    def __init__(self, head, rest):
        self.head = head    # chunks already read, the last one has content
        self.rest = rest    # the generator for the remainder

    def close(self):
        self.rest.close()


def prime(chunks):
    """Read ``chunks`` until one has content; return a PrimedStream or raise."""
    head = []
    try:
        for chunk in chunks:
            head.append(chunk)
            if has_content(chunk):
                return PrimedStream(head, chunks)
    except BaseException:
        chunks.close()
        raise
    chunks.close()
    raise errors.UpstreamError("upstream stream ended before any content",
                               reason="closed-early")
