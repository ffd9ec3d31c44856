"""The Redactor: configured keys, any 8-character run of them, key shapes; before any cut."""

import pytest

from app.redact import REDACTED, Redactor

GOOGLE = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
GROQ = "gsk_Wq7ZbT2pN9xLmR4vK8sD3fYhJ6cA1eUoGi5tBn0XwQ"
TOGETHER = "3f9c2a7d1b8e4f6a0c5d9e2b7a1f4c8d6e3b0a9f2c7d5e1b8a4f6c0d3e9b2a7f"
KEYS = {"google": GOOGLE, "groq": GROQ, "together": TOGETHER}


def runs(key, size=8):
    return [key[i:i + size] for i in range(len(key) - size + 1)]


def leaks(text, key):
    return [run for run in runs(key) if run in text]


@pytest.mark.parametrize("provider", list(KEYS))
@pytest.mark.parametrize("inside", [1, 4, 7, 8, 10, 20, 35])
def test_key_straddling_the_cut_leaves_nothing_behind(provider, inside):
    key = KEYS[provider]
    text = "upstream said: " + "e" * (500 - 15 - inside) + key + " is not valid"
    out = Redactor([key]).redact(text, limit=500)
    assert len(out) <= 500
    for size in (4, 8):
        assert not any(piece in out for piece in runs(key, size)), (inside, out[-40:])


@pytest.mark.parametrize("provider", list(KEYS))
def test_cut_before_redaction_would_leak_but_runs_catch_what_is_left(provider):
    # What a caller that cuts first hands over: the start of the key, 10 characters.
    key = KEYS[provider]
    out = Redactor([key]).redact("message ending in " + key[:10])
    assert leaks(out, key) == [] and out.endswith(REDACTED)


@pytest.mark.parametrize("provider", list(KEYS))
@pytest.mark.parametrize("start, end", [(0, 8), (5, 13), (3, 30), (12, -1)])
def test_any_8_character_run_of_a_key_is_redacted(provider, start, end):
    key = KEYS[provider]
    piece = key[start:end]
    out = Redactor([key]).redact(f"before {piece} after")
    assert out == f"before {REDACTED} after"


def test_a_7_character_piece_alone_is_left(provider="together"):
    key = KEYS[provider]
    assert Redactor([key]).redact(f"id {key[5:12]} ok") == f"id {key[5:12]} ok"


def test_two_pieces_of_a_key_are_each_redacted():
    out = Redactor([TOGETHER]).redact(f"a={TOGETHER[:12]} b={TOGETHER[-12:]}")
    assert out == f"a={REDACTED} b={REDACTED}"


def test_whole_key_is_one_redaction():
    assert Redactor([GROQ]).redact(f"key {GROQ}.") == f"key {REDACTED}."


@pytest.mark.parametrize("text", [
    "This model's maximum context length is 8192 tokens",
    "groq/llama-3.1-8b-instant failed with HTTP 500: upstream overloaded",
    "POST /v1/chat/completions 200 12.3ms model=ollama/qwen2.5:7b",
])
def test_ordinary_text_is_left_alone(text):
    assert Redactor(KEYS.values()).redact(text) == text


def test_limit_cuts_after_redacting():
    out = Redactor([GROQ]).redact("x" * 10 + GROQ + "y" * 100, limit=30)
    assert out == "x" * 10 + REDACTED + "y" * 10


@pytest.mark.parametrize("text", ["", None])
def test_empty_text_is_returned_as_is(text):
    assert Redactor([GROQ]).redact(text) == text


def test_short_secret_is_still_replaced_whole():
    assert Redactor(["abcde"]).redact("x abcde y") == f"x {REDACTED} y"
