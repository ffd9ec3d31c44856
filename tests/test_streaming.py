"""Reading upstream streams: lines, SSE events, and priming a stream until its first content."""

import pytest

from app import errors
from app.streaming import MAX_LINE, prime, split_lines, sse_data


def test_lines_split_across_chunks_come_out_whole():
    chunks = [b"data: a\r", b"\ndata: b\n\nda", b"ta: c", b"\n", b"tail"]
    assert list(split_lines(iter(chunks), "groq/m")) == [
        b"data: a", b"data: b", b"", b"data: c", b"tail"]


def test_a_line_longer_than_the_limit_fails_the_stream():
    chunks = (b"x" * 65536 for _ in range(MAX_LINE // 65536 + 2))
    with pytest.raises(errors.UpstreamError) as caught:
        list(split_lines(chunks, "groq/m"))
    assert (caught.value.reason, caught.value.on_failure) == ("malformed-response", "trip")


def test_a_long_line_within_the_limit_is_kept():
    chunks = [b"y" * 1000] * 500 + [b"\n"]
    assert list(split_lines(iter(chunks), "groq/m")) == [b"y" * 500_000]


def test_sse_data_stops_at_done_and_skips_comments():
    lines = [b": keep-alive", b"data: {\"a\": 1}", b"", b"event: x", b"data: [DONE]",
             b"data: {\"b\": 2}"]
    assert list(sse_data(iter(lines), "groq/m")) == [{"a": 1}]


def test_malformed_sse_event_is_malformed_response():
    with pytest.raises(errors.UpstreamError) as caught:
        list(sse_data(iter([b"data: {nope"]), "groq/m"))
    assert caught.value.reason == "malformed-response"


def chunk(text=None):
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {},
                         "finish_reason": None}]}


def generator(items, closed):
    try:
        yield from items
    finally:
        closed.append(True)


def test_prime_holds_the_chunks_before_the_first_content():
    closed = []
    primed = prime(generator([chunk(), chunk("hi"), chunk("more")], closed))
    assert primed.head == [chunk(), chunk("hi")]
    assert list(primed.rest) == [chunk("more")]


def test_endless_empty_events_before_content_fail_the_entry_and_close_it():
    closed = []
    endless = generator((chunk() for _ in range(10**9)), closed)
    with pytest.raises(errors.UpstreamError) as caught:
        prime(endless, max_head=10_000)
    assert (caught.value.reason, caught.value.on_failure) == ("malformed-response", "trip")
    assert closed == [True]


def test_a_stream_without_content_is_closed_early():
    closed = []
    with pytest.raises(errors.UpstreamError) as caught:
        prime(generator([chunk(), chunk()], closed))
    assert caught.value.reason == "closed-early"
    assert closed == [True]
