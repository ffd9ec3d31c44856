"""Log lines: request ids, secrets redacted (tracebacks too), one record is one line."""

import io
import logging

import pytest

from app.redact import Redactor
from app.request_log import configure_logging, escape_controls

KEY = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
PLAIN_KEY = "3f9c2a7d1b8e4f6a0c5d9e2b7a1f4c8d"


@pytest.fixture
def logged():
    """Configure the ``app`` loggers as a worker does; return a reader of what they wrote."""
    configure_logging("debug", Redactor([KEY, PLAIN_KEY]))
    stream = io.StringIO()
    ours = [h for h in logging.getLogger("app").handlers if getattr(h, "_mana_llm", False)]
    ours[0].setStream(stream)

    def read():
        return stream.getvalue()

    yield read
    logging.getLogger("app").removeHandler(ours[0])


def fail_with(text):
    raise ValueError(f"invalid literal for int() with base 10: {text!r}")


@pytest.mark.parametrize("key", [KEY, PLAIN_KEY])
def test_key_in_a_traceback_is_redacted(logged, key):
    try:
        fail_with(key)
    except ValueError:
        logging.getLogger("app.routing").warning("unexpected answer shape", exc_info=True)
    out = logged()
    assert "unexpected answer shape" in out and "ValueError" in out
    assert key[:8] not in out and key[-8:] not in out


def test_key_in_stack_info_and_arguments_is_redacted(logged):
    logging.getLogger("app").error("refused: %s / %r", PLAIN_KEY, {"k": KEY},
                                   stack_info=True)
    out = logged()
    assert "refused" in out and PLAIN_KEY[:8] not in out and KEY[:8] not in out


FORGED = "2026-01-01 00:00:00,000 INFO [1] [-] app.access: POST /v1/x 200 1.0ms model=x"


@pytest.mark.parametrize("separator", ["\r\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d",
                                       "\x1e", "\x85", "\u2028", "\u2029"])
def test_every_record_is_exactly_one_line(logged, separator):
    logging.getLogger("app.routing").warning("upstream said: %s",
                                             f"boom{separator}{FORGED}{separator}")
    out = logged()
    assert len(out.splitlines()) == 1
    assert out.count("\n") == 1 and out.endswith("\n")
    assert FORGED in out and not out.startswith(FORGED[:10])


def test_traceback_is_one_line_too(logged):
    try:
        fail_with(f"x\r\n{FORGED}")
    except ValueError:
        logging.getLogger("app").exception("unhandled error")
    out = logged()
    assert len(out.splitlines()) == 1 and "Traceback" in out


@pytest.mark.parametrize("text, expected", [
    ("a\r\nb", "a\\r\\nb"), ("\x1b[31mred", "\\x1b[31mred"), ("nul\x00", "nul\\x00"),
    ("tab\there", "tab\\there"), ("del\x7f", "del\\x7f"), ("c1\x9b", "c1\\x9b"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("caf\u00e9 \u6a21\u578b", "caf\u00e9 \u6a21\u578b"), ("back\\slash", "back\\slash"),
])
def test_escape_controls(text, expected):
    assert escape_controls(text) == expected


def test_request_id_is_on_every_line(logged):
    logging.getLogger("app").info("outside a request")
    assert "[-] app: outside a request" in logged()


def test_server_log_lines_are_cleaned_too():
    server_log = logging.getLogger("gunicorn.error")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[gunicorn] %(message)s"))
    server_log.addHandler(handler)
    try:
        for _ in range(2):  # a second app in the same process must not wrap twice
            configure_logging("info", Redactor([PLAIN_KEY]))
        try:
            fail_with(f"{PLAIN_KEY}\r\n{FORGED}")
        except ValueError:
            server_log.exception("Error handling request")
    finally:
        server_log.removeHandler(handler)
    out = stream.getvalue()
    assert out.startswith("[gunicorn] Error handling request") and "Traceback" in out
    assert len(out.splitlines()) == 1 and PLAIN_KEY[:8] not in out
