"""``hash-key``, ``check-keys``, ``check-config`` with keys and prices, and auth in-process."""

import io
import json
import os

import pytest
import yaml

from app import __main__ as cli
from app.callers import hash_key
from tests.conftest import REPO

GOOD = {"callers": [{"name": "api", "keys": [hash_key("k1")], "models": ["mana/*"]},
                    {"name": "ops", "keys": [hash_key("k2")]}]}


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_hash_key_prints_the_line_to_paste(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == f'keys: ["{hash_key("s3cret")}"]'


def test_hash_key_without_a_key_fails(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["hash-key"]) == 1


def test_check_keys_accepts_a_good_file(tmp_path, capsys):
    assert cli.main(["check-keys", write(tmp_path / "k.yaml", GOOD)]) == 0
    assert "ok, 2 callers" in capsys.readouterr().out


def test_check_keys_names_the_caller_and_rule(tmp_path, capsys):
    bad = {"callers": [{"name": "api", "keys": ["k1"]}]}
    assert cli.main(["check-keys", write(tmp_path / "k.yaml", bad)]) == 1
    assert "caller 'api': key" in capsys.readouterr().err


def test_check_keys_without_path_or_keys_path_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYS_PATH", raising=False)
    assert cli.main(["check-keys"]) == 1
    assert "KEYS_PATH is not set" in capsys.readouterr().err


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("KEYS_PATH", "PRICES_PATH", "ALIASES_PATH", "GPU_API_KEY", "ADMIN_KEY_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALIASES_PATH", os.path.join(REPO, "aliases.yaml"))
    return tmp_path


def test_check_config_hands_keys_and_prices_to_the_workers(config_dir, monkeypatch, capsys):
    monkeypatch.setenv("KEYS_PATH", write(config_dir / "k.yaml", GOOD))
    assert cli.main(["check-config", "--json"]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in snapshot["callers"]["callers"]] == ["api", "ops"]
    assert snapshot["prices"]["defaults"]["ollama"] == {"prompt": 0.0, "completion": 0.0}


def test_check_config_rejects_an_admin_who_is_no_caller(config_dir, monkeypatch, capsys):
    monkeypatch.setenv("KEYS_PATH", write(config_dir / "k.yaml", GOOD))
    monkeypatch.setenv("ADMIN_KEY_NAME", "root")
    assert cli.main(["check-config"]) == 1
    assert "ADMIN_KEY_NAME 'root' names no caller" in capsys.readouterr().err


def test_check_config_rejects_a_bad_key_file(config_dir, monkeypatch, capsys):
    monkeypatch.setenv("KEYS_PATH", write(config_dir / "k.yaml", {"callers": []}))
    assert cli.main(["check-config", "--json"]) == 1
    assert "non-empty 'callers' list" in capsys.readouterr().err


def test_check_config_warns_about_unpriced_entries(config_dir, monkeypatch, capsys):
    monkeypatch.setenv("PRICES_PATH", write(config_dir / "p.yaml", {
        "defaults": {"ollama": {"prompt": 0, "completion": 0}}}))
    assert cli.main(["check-config"]) == 0
    err = capsys.readouterr().err
    assert "warning: no price for groq/llama-3.1-8b-instant" in err
    assert "ollama/" not in err


def test_check_config_rejects_a_bad_price_file(config_dir, monkeypatch, capsys):
    monkeypatch.setenv("PRICES_PATH", write(config_dir / "p.yaml", {"models": {"x": 1}}))
    assert cli.main(["check-config"]) == 1
    assert "must be 'provider/model'" in capsys.readouterr().err


# --- auth in-process --------------------------------------------------------------------------

def chat(client, key=None, model="ollama/m"):
    headers = {"X-API-Key": key} if key else {}
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": model, "messages": [{"role": "user", "content": "x"}]})


def test_gpu_api_key_alone_is_the_caller_default(app_factory):
    client = app_factory({"GPU_API_KEY": "s3cret"}).test_client()
    assert chat(client).status_code == 401
    usage = client.get("/v1/usage", headers={"X-API-Key": "s3cret"}).get_json()
    assert [c["caller"] for c in usage["callers"]] == ["default"]


def test_with_auth_off_everyone_is_anonymous(app_factory):
    client = app_factory({}).test_client()
    usage = client.get("/v1/usage").get_json()
    assert [c["caller"] for c in usage["callers"]] == ["anonymous"]
    assert usage["callers"][0]["shared"] is False  # no gunicorn master: per process


def test_a_forbidden_model_is_refused_in_process(app_factory, tmp_path):
    client = app_factory({"KEYS_PATH": write(tmp_path / "k.yaml", GOOD)}).test_client()
    response = chat(client, "k1", model="ollama/m")
    assert response.status_code == 403
    assert response.get_json()["detail"]["kind"] == "forbidden"
    assert chat(client, "k2", model="mana/nope").status_code == 404  # allowed, then routed
    assert client.get("/health").status_code == 200  # open paths stay open
