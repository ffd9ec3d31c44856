"""Where a worker's configuration comes from: the master's snapshot, never a rejected file."""

import json

import pytest

from app import SNAPSHOT_VARIABLE, create_app, load_settings
from app.config import ConfigError

ALIASES = {"aliases": {"mana/x": {"description": "", "chain": ["ollama/m"]}},
           "default": "mana/x"}


def test_worker_uses_the_snapshot_not_a_broken_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CONNECT_TIMEOUT=abc\n")
    monkeypatch.setenv(SNAPSHOT_VARIABLE, json.dumps(
        {"env": {"CONNECT_TIMEOUT": "7"}, "aliases": ALIASES}))
    config, table = load_settings()
    assert config["CONNECT_TIMEOUT"] == 7.0
    assert list(table.aliases) == ["mana/x"]


def test_without_snapshot_a_broken_dotenv_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SNAPSHOT_VARIABLE, raising=False)
    (tmp_path / ".env").write_text("CONNECT_TIMEOUT=abc\n")
    with pytest.raises(ConfigError, match="CONNECT_TIMEOUT"):
        load_settings()


def test_app_serves_the_snapshot_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SNAPSHOT_VARIABLE, json.dumps({"env": {}, "aliases": ALIASES}))
    app = create_app()
    try:
        doc = app.test_client().get("/v1/aliases").get_json()
        assert doc["default"] == "mana/x"
    finally:
        app.extensions["mana_llm"].stop()
