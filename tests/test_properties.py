"""Property tests for the parsers of callers' and operators' input.

Whatever a caller sends (a model string, message content, a whole body)
the answer is a result or a 4xx GatewayError, never another exception
(which would be a 500). Whatever an operator writes in an alias file, the
answer is a table or an AliasConfigError naming the problem. The tests
state the contract, not today's messages, so new rules can be added
without touching them.
"""

import copy
import json
import string

import flask
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from app import errors
from app.providers import KNOWN_PROVIDERS
from app.routing.aliases import (MAX_MODEL_LENGTH, AliasConfigError, AliasTable, Entry,
                                 check_model_string, load_aliases, parse_aliases,
                                 resolve_chain, split_entry)
from app.validation import ROLES, chat_request, embeddings_request, parse_json_body

# Bounded and derandomized: the file runs in seconds, and CI sees the same cases each run.
BOUNDED = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

TABLE = parse_aliases({
    "aliases": {"mana/fast-text": {"chain": ["ollama/qwen2.5:7b", "groq/llama-3.1-8b-instant"]},
                "mana/vision": {"chain": ["openrouter/openai/gpt-4o-mini"]}},
    "default": "mana/fast-text"})

# -- strategies ----------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
           | st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
PROVIDER_PREFIXES = st.sampled_from(KNOWN_PROVIDERS + ("OLLAMA", "Groq", "mana", "nope", ""))
MODEL_PARTS = st.text(max_size=30) | st.sampled_from(
    ["qwen2.5:7b", "anthropic/claude-3.5-sonnet", "模型", "a/b/c", " x ", "", "fast-text"])
MODEL_STRINGS = st.one_of(
    st.builds("{}/{}".format, PROVIDER_PREFIXES, MODEL_PARTS),
    st.text(max_size=40),
    st.text(max_size=300, alphabet=string.printable),
    st.sampled_from(["mana/fast-text", "mana/vision", "mana/nope", "", "gemma3:4b"]),
)


def with_one_field_replaced(bodies, keys, values):
    """Return bodies with one field (present or not) set to an arbitrary value."""
    return st.builds(lambda body, key, value: {**body, key: value}, bodies,
                     st.sampled_from(sorted(keys)), values)


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
    st.fixed_dictionaries({"url": st.text(max_size=20)}), st.text(max_size=20))})
PARTS = st.lists(TEXT_PART | IMAGE_PART, max_size=3)
ODD_PARTS = st.lists(TEXT_PART | IMAGE_PART | JSON, min_size=1, max_size=3)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES + ("developer",))},
    optional={"content": st.none() | st.text(max_size=20) | PARTS, "name": st.text(max_size=5),
              "tool_call_id": st.text(max_size=5),
              "tool_calls": st.lists(st.dictionaries(st.text(max_size=5), JSON), max_size=2)})
ODD_MESSAGE = with_one_field_replaced(MESSAGE, {"role", "content", "tool_calls",
                                                "tool_call_id", "name"}, JSON | ODD_PARTS)
NUMBER = st.floats(min_value=-3, max_value=3) | st.integers(min_value=-3, max_value=3)
CHAT_FIELDS = {
    "model": MODEL_STRINGS, "stream": st.booleans(),
    "temperature": NUMBER, "top_p": NUMBER, "max_tokens": NUMBER,
    "max_completion_tokens": NUMBER, "n": NUMBER, "frequency_penalty": NUMBER,
    "presence_penalty": NUMBER,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={"json_schema": st.dictionaries(st.text(max_size=5), JSON, max_size=2)}),
    "tools": st.lists(st.fixed_dictionaries(
        {"type": st.just("function"),
         "function": st.fixed_dictionaries({"name": st.text(max_size=5)},
                                           optional={"parameters": JSON})}), max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required"]),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "extra_field": JSON,
}
GOOD_CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
                                  optional=CHAT_FIELDS)
CHAT_BODIES = st.one_of(
    GOOD_CHAT,
    st.fixed_dictionaries({"messages": st.lists(MESSAGE | ODD_MESSAGE, min_size=1, max_size=3)},
                          optional=CHAT_FIELDS),
    with_one_field_replaced(GOOD_CHAT, set(CHAT_FIELDS) | {"messages"}, JSON),
    st.dictionaries(st.text(max_size=10), JSON, max_size=5),
)
GOOD_EMBEDDINGS = st.fixed_dictionaries(
    {"input": st.text(max_size=10) | st.lists(st.text(max_size=10), min_size=1, max_size=4)},
    optional={"model": MODEL_STRINGS, "encoding_format": st.sampled_from(["float", "base64"])})
EMBEDDING_BODIES = st.one_of(
    GOOD_EMBEDDINGS,
    with_one_field_replaced(GOOD_EMBEDDINGS, {"input", "model", "encoding_format"},
                            JSON | st.sampled_from(["", "hex", []])),
    st.dictionaries(st.text(max_size=10), JSON, max_size=4),
)


def expect_client_error(call, *args):
    """Return ``call(*args)``, or None when it raised a 4xx GatewayError; fail on anything else."""
    try:
        return call(*args)
    except errors.GatewayError as error:
        assert 400 <= error.status < 500, f"{type(error).__name__} {error.status}: {error}"
        assert error.body()["error"]["type"] == error.kind
        return None


# -- model strings -------------------------------------------------------------------------

@BOUNDED
@given(MODEL_STRINGS | JSON)
def test_any_model_string_resolves_or_is_a_client_error(model):
    resolved = expect_client_error(resolve_chain, model, TABLE, KNOWN_PROVIDERS)
    if resolved is None:
        return
    alias, entries = resolved
    assert entries and all(isinstance(e, Entry) for e in entries)
    assert alias is None or alias in TABLE.aliases
    if alias is None:
        assert len(entries) == 1 and entries[0].provider in KNOWN_PROVIDERS


@BOUNDED
@given(MODEL_STRINGS)
def test_a_direct_model_keeps_its_model_part_as_written(model):
    resolved = expect_client_error(resolve_chain, model, TABLE, KNOWN_PROVIDERS)
    if resolved is None or resolved[0] is not None or not model:
        return
    (entry,) = resolved[1]
    prefix, slash, rest = model.partition("/")
    if slash:
        assert entry.provider == prefix.lower()
        assert entry.model == rest
    else:
        assert entry == Entry("ollama", model)


@BOUNDED
@given(st.text(max_size=20), st.sampled_from("\r\n\x00\x1b\x7f\t\u2028"), st.text(max_size=20))
def test_control_characters_in_a_model_string_are_a_400(before, control, after):
    with pytest.raises(errors.GatewayError) as caught:
        resolve_chain(f"groq/{before}{control}{after}", TABLE, KNOWN_PROVIDERS)
    assert caught.value.status == 400


@BOUNDED
@given(st.text(min_size=MAX_MODEL_LENGTH + 1, max_size=MAX_MODEL_LENGTH + 50,
               alphabet=string.ascii_letters))
def test_an_overlong_model_string_is_a_400(model):
    with pytest.raises(errors.GatewayError) as caught:
        check_model_string(model)
    assert caught.value.status == 400


# -- request bodies ------------------------------------------------------------------------

# A real request (headers, stream, limits) for the body parser, as a view sees it.
BARE_APP = flask.Flask(__name__)
BARE_APP.config["MAX_CONTENT_LENGTH"] = 1 << 20


def parse_bytes(data, mimetype="application/json"):
    with BARE_APP.test_request_context("/", method="POST", data=data, content_type=mimetype):
        return parse_json_body(flask.request)


@BOUNDED
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["application/json", "text/plain", "", "application/vnd.x+json"]))
def test_any_bytes_parse_to_an_object_or_a_client_error(data, mimetype):
    body = expect_client_error(parse_bytes, data, mimetype)
    assert body is None or isinstance(body, dict)


def test_deeply_nested_json_is_a_client_error():
    assert expect_client_error(parse_bytes, b"[" * 100_000) is None


@BOUNDED
@given(CHAT_BODIES)
def test_any_chat_body_validates_or_is_a_client_error(body):
    validated = expect_client_error(chat_request, body)
    if validated is None:
        return
    assert isinstance(validated["messages"], list) and validated["messages"]
    for message in validated["messages"]:
        assert message["role"] in ROLES
        content = message.get("content")
        assert content is None or isinstance(content, (str, list))
        for part in content if isinstance(content, list) else ():
            # A bare image URL string is normalised to the object form.
            assert (part["type"], type(part.get("text", part.get("image_url")))) in (
                ("text", str), ("image_url", dict))
            if part["type"] == "image_url":
                assert isinstance(part["image_url"]["url"], str)


@BOUNDED
@given(CHAT_BODIES)
def test_a_validated_chat_body_validates_again_unchanged(body):
    validated = expect_client_error(chat_request, body)
    if validated is None:
        return
    again = copy.deepcopy(validated)
    assert chat_request(again) == validated


@BOUNDED
@given(st.lists(ODD_PARTS | JSON, min_size=1, max_size=3))
def test_message_content_parts_validate_or_are_a_client_error(contents):
    body = {"messages": [{"role": "user", "content": c} for c in contents]}
    expect_client_error(chat_request, body)


@BOUNDED
@given(EMBEDDING_BODIES)
def test_any_embeddings_body_validates_or_is_a_client_error(body):
    validated = expect_client_error(embeddings_request, body)
    if validated is None:
        return
    inputs, encoding = validated
    assert inputs and all(isinstance(i, str) for i in inputs)
    assert encoding in ("float", "base64")


# -- alias files ---------------------------------------------------------------------------

YAML_SCALARS = SCALARS | st.dates() | st.binary(max_size=5)
YAML = st.recursive(YAML_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8) | st.integers() | st.none() | st.booleans(), inner, max_size=3),
    max_leaves=10)
ALIAS_NAMES = st.builds("mana/{}".format, st.text(string.ascii_lowercase + "-", min_size=1,
                                                  max_size=8))
GOOD_ALIAS = st.fixed_dictionaries(
    {"chain": st.lists(st.builds("{}/{}".format, st.sampled_from(KNOWN_PROVIDERS),
                                 MODEL_PARTS.filter(str.strip)), min_size=1, max_size=3)},
    optional={"description": st.text(max_size=10)})
ODD_ALIAS = st.one_of(
    with_one_field_replaced(GOOD_ALIAS, {"chain", "description"}, YAML),
    GOOD_ALIAS.map(lambda alias: {**alias, "chain": alias["chain"] + [""]}),
    st.fixed_dictionaries({"chain": st.lists(
        st.builds("{}/{}".format, PROVIDER_PREFIXES, MODEL_PARTS) | YAML, max_size=3)}),
    YAML)
GOOD_ALIAS_DOCS = st.dictionaries(ALIAS_NAMES, GOOD_ALIAS, min_size=1, max_size=3).flatmap(
    lambda aliases: st.fixed_dictionaries(
        {"aliases": st.just(aliases)},
        optional={"default": st.sampled_from(sorted(aliases))}))
ALIAS_DOCS = st.one_of(
    GOOD_ALIAS_DOCS,
    st.fixed_dictionaries(
        {"aliases": st.dictionaries(ALIAS_NAMES | st.text(max_size=8) | YAML_SCALARS,
                                    GOOD_ALIAS | ODD_ALIAS, max_size=3)},
        optional={"default": ALIAS_NAMES | YAML}),
    with_one_field_replaced(GOOD_ALIAS_DOCS, {"aliases", "default"}, YAML),
    YAML)


def parse_or_none(doc):
    try:
        return parse_aliases(doc)
    except AliasConfigError as exc:
        assert str(exc), "a rejection must say why"
        return None


@BOUNDED
@given(ALIAS_DOCS)
@example({"aliases": {"mana/x": {"chain": [" groq/ llama/3 ", "ollama/qwen2.5:7b"]}},
          "default": "mana/x"})
@example({"aliases": {"mana/x": {"chain": ["OLLAMA/qwen2.5:7b"]}}})  # a walk would skip it
def test_any_alias_document_parses_or_is_rejected_with_a_reason(doc):
    table = parse_or_none(doc)
    if table is None:
        return
    assert isinstance(table, AliasTable) and table.default in table.aliases
    for name, alias in table.aliases.items():
        assert name.startswith("mana/") and alias.chain
        written = doc["aliases"][name]["chain"]
        # Each entry keeps its model part as written (only the provider may be normalised).
        for entry, text in zip(alias.chain, written):
            expected = split_entry(text.strip())
            assert entry.model == expected.model
            assert entry.provider == expected.provider.lower()


@BOUNDED
@given(ALIAS_DOCS)
def test_an_accepted_alias_table_survives_its_snapshot(doc):
    # Workers rebuild the table from the master's JSON snapshot of it.
    table = parse_or_none(doc)
    if table is None:
        return
    assert parse_aliases(json.loads(json.dumps(table.to_doc()))) == table


@pytest.fixture(scope="module")
def alias_path(tmp_path_factory):
    return tmp_path_factory.mktemp("aliases") / "aliases.yaml"


# A file per example is slow to shrink; the explicit examples are already minimal.
@settings(BOUNDED, phases=[Phase.explicit, Phase.generate])
@given(st.text(max_size=200) | ALIAS_DOCS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
@example("description: 2001-13-14")  # PyYAML raises ValueError building the date
@example("aliases: {mana/x: {chain: [0x_]}}")  # ... and for an int it cannot read
@example("a: !!timestamp x")  # ... AttributeError for a tagged timestamp
@example("[" * 2000)  # ... RecursionError for deep nesting
@example("\ufeffaliases: {mana/x: {chain: [groq/m]}}")
def test_any_alias_file_loads_or_is_rejected_with_a_reason(alias_path, text):
    alias_path.write_text(text, encoding="utf-8")
    try:
        load_aliases(str(alias_path))
    except AliasConfigError as exc:
        assert str(exc)
