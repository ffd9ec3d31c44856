"""Model strings (SPEC §2) resolved to routes: aliases, direct models, the default."""

import pytest

from app import errors
from app.providers import KNOWN_PROVIDERS
from app.routing.aliases import Entry, Route, parse_aliases, resolve_chain


def chain(*entries):
    return {"description": "d", "chain": list(entries)}


@pytest.fixture
def table():
    return parse_aliases({
        "aliases": {"mana/fast-text": chain("ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"),
                    "mana/long-form": chain("openrouter/anthropic/claude-3.5-sonnet")},
        "default": "mana/fast-text"})


def resolve(model, table):
    return resolve_chain(model, table, KNOWN_PROVIDERS)


def test_alias_resolves_to_its_chain(table):
    assert resolve("mana/fast-text", table) == Route(
        "mana/fast-text", "mana/fast-text",
        (Entry("ollama", "qwen2.5:7b"), Entry("groq", "llama-3.1-8b-instant")))


@pytest.mark.parametrize("model, entry", [
    ("openrouter/anthropic/claude-3.5-sonnet", Entry("openrouter", "anthropic/claude-3.5-sonnet")),
    ("groq/llama-3.1-8b-instant", Entry("groq", "llama-3.1-8b-instant")),
    ("ollama/gemma3:4b", Entry("ollama", "gemma3:4b")),
])
def test_direct_model_is_one_entry_split_at_first_slash(table, model, entry):
    assert resolve(model, table) == Route(model, None, (entry,))


@pytest.mark.parametrize("model, entry", [
    ("Ollama/gemma3:4b", Entry("ollama", "gemma3:4b")),
    ("GROQ/Llama-3.1-8B-Instant", Entry("groq", "Llama-3.1-8B-Instant")),
    ("Google/gemini-2.0-flash-exp", Entry("google", "gemini-2.0-flash-exp")),
])
def test_provider_prefix_is_case_insensitive_and_the_model_kept(table, model, entry):
    assert resolve(model, table).entries == (entry,)


def test_bare_model_means_ollama(table):
    assert resolve("gemma3:4b", table) == Route("gemma3:4b", None,
                                                (Entry("ollama", "gemma3:4b"),))


@pytest.mark.parametrize("model", [None, ""])
def test_absent_model_is_the_default_alias_and_is_asked_as_it(table, model):
    route = resolve(model, table)
    assert (route.asked, route.alias) == ("mana/fast-text", "mana/fast-text")
    assert route.entries == table.aliases["mana/fast-text"].chain


def test_unknown_alias_is_model_not_found_listing_known_aliases(table):
    with pytest.raises(errors.ModelNotFound) as caught:
        resolve("mana/nope", table)
    assert caught.value.status == 404
    assert "mana/fast-text" in caught.value.message
    assert "mana/long-form" in caught.value.message


def test_unknown_provider_is_model_not_found_naming_known_providers(table):
    with pytest.raises(errors.ModelNotFound) as caught:
        resolve("nosuch/model-x", table)
    assert caught.value.status == 404
    for provider in KNOWN_PROVIDERS:
        assert provider in caught.value.message


@pytest.mark.parametrize("model", [
    pytest.param("mana/fast-text\r\nX-Evil: 1", id="CRLF"),
    pytest.param("gemma3:4b\n", id="LF"),
    pytest.param("groq/llama\x00", id="NUL"),
    pytest.param("groq/llama\tx", id="tab"),
    pytest.param("groq/llama\x1b[31m", id="ESC"),
    pytest.param("x" * 257, id="257-chars"),
    pytest.param("groq/" + "m" * 252, id="257-chars-direct"),
    pytest.param("groq/llama-3.1-8b-instant ", id="trailing-space"),
    pytest.param(" mana/fast-text", id="leading-space"),
    pytest.param(" ", id="only-space"),
    pytest.param("groq/\u6a21\u578b", id="non-ascii-direct"),
    pytest.param("ollama/caf\u00e9", id="latin-1"),
    pytest.param("groq/llama\u00a0x", id="nbsp"),
    pytest.param("groq/llama\u200bx", id="zero-width-space"),
])
def test_unsafe_model_string_is_invalid_request(table, model):
    with pytest.raises(errors.InvalidRequest) as caught:
        resolve(model, table)
    assert caught.value.status == 400
    assert caught.value.param == "model"


def test_model_string_of_256_chars_is_accepted(table):
    model = "m" * 256
    assert resolve(model, table).entries == (Entry("ollama", model),)


@pytest.mark.parametrize("model", [5, ["mana/fast-text"], {"a": 1}, True])
def test_non_string_model_is_invalid_request(table, model):
    with pytest.raises(errors.InvalidRequest):
        resolve(model, table)
