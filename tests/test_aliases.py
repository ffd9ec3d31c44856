"""Alias files (SPEC §5) and model strings (SPEC §2): validation, loading, resolution."""

import os
import subprocess
import sys

import pytest
import yaml

from app import errors
from app.providers import KNOWN_PROVIDERS
from app.routing.aliases import (AliasConfigError, AliasRegistry, Entry, load_aliases,
                                 parse_aliases, resolve_chain)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "aliases.yaml")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
CLOUD = set(KNOWN_PROVIDERS) - {"ollama"}
SHIPPED_ALIASES = ["mana/fast-text", "mana/long-form", "mana/structured", "mana/reasoning",
                   "mana/vision"]


def doc_with(name="mana/fast", body=None, default=None):
    """Return an alias document with one alias, its body replaceable."""
    doc = {"aliases": {name: {"description": "d", "chain": ["groq/llama-3.1-8b-instant"]}
                       if body is None else body}}
    if default is not None:
        doc["default"] = default
    return doc


def chain(*entries):
    return {"description": "d", "chain": list(entries)}


@pytest.fixture
def table():
    return parse_aliases({
        "aliases": {"mana/fast-text": chain("ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"),
                    "mana/long-form": chain("openrouter/anthropic/claude-3.5-sonnet")},
        "default": "mana/fast-text"})


# -- parse_aliases: one case per rule of SPEC §5 -------------------------------------------

@pytest.mark.parametrize("doc, fragments", [
    pytest.param(["mana/fast"], ["root", "mapping"], id="root-is-a-list"),
    pytest.param("aliases", ["root", "mapping"], id="root-is-a-string"),
    pytest.param(None, ["root", "mapping"], id="root-is-empty"),
    pytest.param({"default": "mana/fast"}, ["aliases", "non-empty mapping"],
                 id="aliases-missing"),
    pytest.param({"aliases": {}}, ["aliases", "non-empty mapping"], id="aliases-empty"),
    pytest.param({"aliases": ["mana/fast"]}, ["aliases", "non-empty mapping"],
                 id="aliases-not-a-mapping"),
])
def test_file_level_rule_is_rejected(doc, fragments):
    with pytest.raises(AliasConfigError) as caught:
        parse_aliases(doc)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("name, body, rule", [
    pytest.param("fast-text", None, "must start with 'mana/'", id="name-without-mana"),
    pytest.param("gpt/fast", None, "must start with 'mana/'", id="name-other-prefix"),
    pytest.param("mana/fast/text", None, "exactly one segment", id="name-two-segments"),
    pytest.param("mana/", None, "exactly one segment", id="name-empty-segment"),
    pytest.param("mana//fast", None, "exactly one segment", id="name-empty-first-segment"),
    pytest.param("mana/fast", ["groq/x"], "body must be a mapping", id="body-list"),
    pytest.param("mana/fast", "groq/x", "body must be a mapping", id="body-string"),
    pytest.param("mana/fast", {"description": 5, "chain": ["groq/x"]},
                 "description must be a string", id="description-number"),
    pytest.param("mana/fast", {"description": ["a"], "chain": ["groq/x"]},
                 "description must be a string", id="description-list"),
    pytest.param("mana/fast", {"description": "d"}, "chain must be a non-empty list",
                 id="chain-missing"),
    pytest.param("mana/fast", chain(), "chain must be a non-empty list", id="chain-empty"),
    pytest.param("mana/fast", {"chain": "groq/x"}, "chain must be a non-empty list",
                 id="chain-a-string"),
    pytest.param("mana/fast", chain(""), "non-empty strings", id="entry-empty"),
    pytest.param("mana/fast", chain("   "), "non-empty strings", id="entry-blank"),
    pytest.param("mana/fast", chain(42), "non-empty strings", id="entry-number"),
    pytest.param("mana/fast", chain(None), "non-empty strings", id="entry-null"),
    pytest.param("mana/fast", chain("gemma3:4b"), "provider prefix", id="entry-no-prefix"),
    pytest.param("mana/fast", chain("/gemma3:4b"), "provider prefix",
                 id="entry-empty-provider"),
    pytest.param("mana/fast", chain("groq/"), "provider prefix", id="entry-empty-model"),
])
def test_alias_rule_is_rejected_naming_alias_and_rule(name, body, rule):
    with pytest.raises(AliasConfigError) as caught:
        parse_aliases(doc_with(name, body))
    assert repr(name) in str(caught.value)
    assert rule in str(caught.value)


def test_bad_entry_after_good_ones_rejects_the_whole_file():
    with pytest.raises(AliasConfigError, match="'mana/b'"):
        parse_aliases({"aliases": {"mana/a": chain("groq/x"), "mana/b": chain("groq/x", 3)}})


def test_default_naming_no_alias_is_rejected():
    with pytest.raises(AliasConfigError) as caught:
        parse_aliases(doc_with(default="mana/missing"))
    assert "'mana/missing'" in str(caught.value)
    assert "names no defined alias" in str(caught.value)


@pytest.mark.parametrize("default", [["mana/fast"], {"name": "mana/fast"}])
def test_default_of_wrong_type_is_rejected(default):
    with pytest.raises(AliasConfigError, match="default"):
        parse_aliases(doc_with(default=default))


def test_valid_document_becomes_a_table():
    table = parse_aliases({"aliases": {"mana/fast": chain(
        "ollama/qwen2.5:7b", "openrouter/anthropic/claude-3-haiku")}, "default": "mana/fast"})
    alias = table.aliases["mana/fast"]
    assert alias.chain == (Entry("ollama", "qwen2.5:7b"),
                           Entry("openrouter", "anthropic/claude-3-haiku"))
    assert (alias.description, table.default) == ("d", "mana/fast")


def test_description_is_optional():
    table = parse_aliases(doc_with(body={"chain": ["groq/x"]}))
    assert table.aliases["mana/fast"].description == ""


# -- load_aliases -------------------------------------------------------------------------

def test_non_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("aliases: [unclosed\n  - : :\n")
    with pytest.raises(AliasConfigError, match="not valid YAML"):
        load_aliases(str(path))


@pytest.mark.parametrize("text", [
    "aliases: {mana/x: {description: 2001-13-14, chain: [groq/x]}}\n",
    "aliases: {mana/x: {chain: [0x_]}}\n",
    "a: !!timestamp x\n",
    "[" * 2000,
])
def test_yaml_that_breaks_the_parser_is_rejected_with_a_reason(tmp_path, text):
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    with pytest.raises(AliasConfigError, match="not valid YAML"):
        load_aliases(str(path))


def test_missing_file_is_rejected(tmp_path):
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(AliasConfigError, match="cannot read") as caught:
        load_aliases(path)
    assert path in str(caught.value)


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_bytes(b"aliases:\n  mana/caf\xe9:\n    chain: [groq/x]\n")
    with pytest.raises(AliasConfigError, match="UTF-8"):
        load_aliases(str(path))


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("")
    with pytest.raises(AliasConfigError, match="root"):
        load_aliases(str(path))


# -- the shipped aliases.yaml -------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return load_aliases(SHIPPED)


def test_shipped_file_defines_the_five_classes(shipped):
    assert sorted(shipped.aliases) == sorted(SHIPPED_ALIASES)


def test_shipped_default_is_fast_text(shipped):
    assert shipped.default == "mana/fast-text"


@pytest.mark.parametrize("name", SHIPPED_ALIASES)
def test_shipped_chain_ends_in_a_cloud_provider(shipped, name):
    assert shipped.aliases[name].chain[-1].provider in CLOUD


@pytest.mark.parametrize("name", SHIPPED_ALIASES)
def test_shipped_chain_names_only_known_providers(shipped, name):
    assert {e.provider for e in shipped.aliases[name].chain} <= set(KNOWN_PROVIDERS)


def test_shipped_reasoning_starts_in_the_cloud(shipped):
    assert shipped.aliases["mana/reasoning"].chain[0].provider in CLOUD


# -- resolve_chain ------------------------------------------------------------------------

def test_alias_resolves_to_its_chain(table):
    assert resolve_chain("mana/fast-text", table, KNOWN_PROVIDERS) == (
        "mana/fast-text", [Entry("ollama", "qwen2.5:7b"),
                           Entry("groq", "llama-3.1-8b-instant")])


@pytest.mark.parametrize("model, entry", [
    ("openrouter/anthropic/claude-3.5-sonnet", Entry("openrouter", "anthropic/claude-3.5-sonnet")),
    ("groq/llama-3.1-8b-instant", Entry("groq", "llama-3.1-8b-instant")),
    ("ollama/gemma3:4b", Entry("ollama", "gemma3:4b")),
])
def test_direct_model_is_one_entry_split_at_first_slash(table, model, entry):
    assert resolve_chain(model, table, KNOWN_PROVIDERS) == (None, [entry])


def test_bare_model_means_ollama(table):
    assert resolve_chain("gemma3:4b", table, KNOWN_PROVIDERS) == (
        None, [Entry("ollama", "gemma3:4b")])


@pytest.mark.parametrize("model", [None, ""])
def test_absent_model_uses_default_alias(table, model):
    name, entries = resolve_chain(model, table, KNOWN_PROVIDERS)
    assert name == "mana/fast-text"
    assert entries == list(table.aliases["mana/fast-text"].chain)


def test_unknown_alias_is_model_not_found_listing_known_aliases(table):
    with pytest.raises(errors.ModelNotFound) as caught:
        resolve_chain("mana/nope", table, KNOWN_PROVIDERS)
    assert caught.value.status == 404
    assert "mana/fast-text" in caught.value.message
    assert "mana/long-form" in caught.value.message


def test_unknown_provider_is_model_not_found_naming_known_providers(table):
    with pytest.raises(errors.ModelNotFound) as caught:
        resolve_chain("nosuch/model-x", table, KNOWN_PROVIDERS)
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
])
def test_unsafe_model_string_is_invalid_request(table, model):
    with pytest.raises(errors.InvalidRequest) as caught:
        resolve_chain(model, table, KNOWN_PROVIDERS)
    assert caught.value.status == 400
    assert caught.value.param == "model"


def test_model_string_of_256_chars_is_accepted(table):
    model = "m" * 256
    assert resolve_chain(model, table, KNOWN_PROVIDERS) == (None, [Entry("ollama", model)])


@pytest.mark.parametrize("model", [5, ["mana/fast-text"], {"a": 1}, True])
def test_non_string_model_is_invalid_request(table, model):
    with pytest.raises(errors.InvalidRequest):
        resolve_chain(model, table, KNOWN_PROVIDERS)


# -- AliasRegistry ------------------------------------------------------------------------

def test_registry_swap_replaces_the_whole_table(table):
    registry = AliasRegistry(table)
    replacement = parse_aliases({"aliases": {"mana/new": chain("groq/x")}})
    registry.swap(replacement)
    assert registry.table is replacement
    assert registry.get("mana/new").chain == (Entry("groq", "x"),)
    assert registry.get("mana/fast-text") is None


# -- python -m app check-aliases ----------------------------------------------------------

def check_aliases(path):
    env = {k: v for k, v in os.environ.items() if k != "ALIASES_PATH"}
    return subprocess.run([PYTHON if os.path.exists(PYTHON) else sys.executable,
                           "-m", "app", "check-aliases", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def test_check_aliases_accepts_good_file(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump({"aliases": {"mana/fast": chain("groq/x")}}))
    result = check_aliases(path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_aliases_rejects_bad_file_with_reason(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump({"aliases": {"mana/fast": chain("gemma3:4b")}}))
    result = check_aliases(path)
    assert result.returncode == 1
    assert "'mana/fast'" in result.stderr
    assert "provider prefix" in result.stderr
    assert "Traceback" not in result.stderr


# -- provider names in chains and model strings --------------------------------------------

@pytest.mark.parametrize("entry", ["groc/llama-3.1-8b-instant", "acme/x", "mana/fast-text",
                                   "http://evil/x"])
def test_chain_entry_naming_unknown_provider_is_rejected(entry):
    with pytest.raises(AliasConfigError) as caught:
        parse_aliases(doc_with(body=chain("ollama/qwen2.5:7b", entry)))
    message = str(caught.value)
    assert "'mana/fast'" in message and repr(entry) in message
    assert "unknown provider" in message and "groq" in message


@pytest.mark.parametrize("entry, expected", [
    ("Groq/llama-3.1-8b-instant", Entry("groq", "llama-3.1-8b-instant")),
    ("OLLAMA/Qwen2.5:7B", Entry("ollama", "Qwen2.5:7B")),
    ("OpenRouter/Anthropic/Claude-3-Haiku", Entry("openrouter", "Anthropic/Claude-3-Haiku")),
])
def test_chain_entry_provider_is_case_insensitive_model_kept(entry, expected):
    table = parse_aliases(doc_with(body=chain(entry)))
    assert table.aliases["mana/fast"].chain == (expected,)


@pytest.mark.parametrize("name, body", [
    ("mana/caf\u00e9", chain("groq/x")),
    ("mana/fast", chain("groq/\u6a21\u578b")),
    ("mana/fast", chain("groq/x\u2028y")),
], ids=["alias-name", "entry", "entry-line-separator"])
def test_non_ascii_alias_name_or_entry_is_rejected(name, body):
    with pytest.raises(AliasConfigError) as caught:
        parse_aliases(doc_with(name=name, body=body))
    assert "printable ASCII" in str(caught.value)


@pytest.mark.parametrize("model, entry", [
    ("Ollama/gemma3:4b", Entry("ollama", "gemma3:4b")),
    ("GROQ/Llama-3.1-8B-Instant", Entry("groq", "Llama-3.1-8B-Instant")),
    ("Google/gemini-2.0-flash-exp", Entry("google", "gemini-2.0-flash-exp")),
])
def test_direct_model_provider_prefix_is_case_insensitive(table, model, entry):
    assert resolve_chain(model, table, KNOWN_PROVIDERS) == (None, [entry])


@pytest.mark.parametrize("model", ["groq/\u6a21\u578b", "ollama/caf\u00e9", "\u6a21\u578b",
                                   "groq/llama\u00a0x", "groq/llama\u200bx"])
def test_non_ascii_model_string_is_invalid_request(table, model):
    with pytest.raises(errors.InvalidRequest) as caught:
        resolve_chain(model, table, KNOWN_PROVIDERS)
    assert caught.value.param == "model"


def test_check_aliases_rejects_unknown_provider_naming_alias_and_entry(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump({"aliases": {"mana/fast": chain(
        "ollama/qwen2.5:7b", "groc/llama-3.1-8b-instant")}}))
    result = check_aliases(path)
    assert result.returncode == 1
    assert "'mana/fast'" in result.stderr and "'groc/llama-3.1-8b-instant'" in result.stderr
    assert "Traceback" not in result.stderr
