"""The key file: validation naming the caller and rule, hashing, lookup, model globs."""

import hashlib

import pytest

from app import errors
from app.callers import (ANONYMOUS, Caller, KeysConfigError, caller_table, hash_key,
                         load_keys, parse_keys, single_key_table)

ALICE = hash_key("alice-key")
BOB = hash_key("bob-key")


def doc(*callers):
    return {"callers": list(callers)}


def test_hash_key_is_sha256_hex_with_a_prefix():
    assert ALICE == "sha256:" + hashlib.sha256(b"alice-key").hexdigest()


def test_a_key_finds_its_caller_and_only_its_own():
    table = parse_keys(doc({"name": "api", "keys": [ALICE]}, {"name": "batch", "keys": [BOB]}))
    assert table.find("alice-key").name == "api"
    assert table.find("bob-key").name == "batch"
    assert table.find("carol-key") is None
    assert table.find("") is None


def test_several_keys_rotate_one_caller():
    table = parse_keys(doc({"name": "api", "keys": [ALICE, BOB]}))
    assert table.find("alice-key") is table.find("bob-key")


@pytest.mark.parametrize("callers, complaint", [
    ([{"name": "API", "keys": [ALICE]}], "caller 'API': name must match"),
    ([{"name": "a" * 33, "keys": [ALICE]}], "name must match"),
    ([{"keys": [ALICE]}], "caller #1: name must match"),
    ([{"name": "api"}], "caller 'api': keys must be a non-empty list"),
    ([{"name": "api", "keys": ["alice-key"]}], "is not 'sha256:'"),
    ([{"name": "api", "keys": [ALICE.upper()]}], "is not 'sha256:'"),
    ([{"name": "api", "keys": [ALICE]}, {"name": "api", "keys": [BOB]}], "used twice"),
    ([{"name": "a", "keys": [ALICE]}, {"name": "b", "keys": [ALICE]}], "also caller 'a'"),
    ([{"name": "api", "keys": [ALICE], "models": []}], "models must be a non-empty list"),
    ([{"name": "api", "keys": [ALICE], "models": ["ok/*", 3]}], "model glob 3"),
    ([{"name": "api", "keys": [ALICE], "limits": {"rpm": 1}}], "unknown limit 'rpm'"),
    ([{"name": "api", "keys": [ALICE], "limits": {"requests_per_minute": 0}}],
     "requests_per_minute must be a whole number >= 1"),
    ([{"name": "api", "keys": [ALICE], "limits": {"tokens_per_day": True}}],
     "tokens_per_day must be a whole number"),
    ([{"name": "api", "keys": [ALICE], "limit": {}}], "unknown field 'limit'"),
    (["api"], "caller #1: must be a mapping"),
])
def test_bad_callers_are_rejected_naming_caller_and_rule(callers, complaint):
    with pytest.raises(KeysConfigError) as raised:
        parse_keys(doc(*callers))
    assert complaint in str(raised.value)


@pytest.mark.parametrize("document", [None, [], {"callers": []}, {"callers": "x"}, {"x": 1}])
def test_bad_roots_are_rejected(document):
    with pytest.raises(KeysConfigError, match="non-empty 'callers' list"):
        parse_keys(document)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("callers:\n  - name: Bad\n    keys: []\n")
    with pytest.raises(KeysConfigError, match=f"{path}: caller 'Bad'"):
        load_keys(str(path))
    with pytest.raises(KeysConfigError, match="cannot read"):
        load_keys(str(tmp_path / "missing.yaml"))
    path.write_text("callers: [unclosed\n")
    with pytest.raises(KeysConfigError, match="not valid YAML"):
        load_keys(str(path))


def test_round_trip_through_the_snapshot_document():
    table = parse_keys(doc({"name": "api", "keys": [ALICE], "models": ["mana/*"],
                            "limits": {"requests_per_minute": 60}}))
    assert parse_keys(table.to_doc()) == table


@pytest.mark.parametrize("model, allowed", [
    ("mana/fast-text", True), ("ollama/qwen2.5:7b", True), ("qwen2.5:7b", True),
    ("groq/llama-3.1-8b-instant", False), ("together/mana/x", False), ("openai/gpt-4o", False),
])
def test_models_are_globs_over_the_model_as_asked(model, allowed):
    caller = Caller("api", (ALICE,), models=("mana/*", "ollama/*"))
    assert caller.allows(model) is allowed


def test_a_forbidden_model_is_a_403():
    caller = Caller("api", (ALICE,), models=("mana/*",))
    with pytest.raises(errors.Forbidden) as raised:
        caller.require_model("openai/gpt-4o")
    assert raised.value.status == 403 and raised.value.kind == "forbidden"


def test_no_models_means_every_model():
    assert Caller("api").allows("openai/anything")


def test_gpu_api_key_alone_is_one_caller_named_default():
    table = caller_table({"GPU_API_KEY": "s3cret", "GPU_REQUIRE_AUTH": True, "KEYS_PATH": ""})
    assert table == single_key_table("s3cret")
    assert table.find("s3cret").name == "default" and table.required


def test_without_keys_auth_is_off_and_everyone_is_anonymous():
    table = caller_table({"GPU_API_KEY": "", "GPU_REQUIRE_AUTH": True, "KEYS_PATH": ""})
    assert not table.required and list(table.callers) == [ANONYMOUS]
    off = caller_table({"GPU_API_KEY": "s3cret", "GPU_REQUIRE_AUTH": False, "KEYS_PATH": ""})
    assert not off.required


def test_the_key_file_wins_over_gpu_api_key(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"callers:\n  - name: api\n    keys: ['{ALICE}']\n")
    table = caller_table({"GPU_API_KEY": "s3cret", "GPU_REQUIRE_AUTH": True,
                          "KEYS_PATH": str(path)})
    assert table.find("s3cret") is None and table.find("alice-key").name == "api"
