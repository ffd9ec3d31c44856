"""Configuration (SPEC §11): defaults, validation naming the variable, the .env file."""

import pytest

from app.config import ConfigError, build_config, from_env


@pytest.mark.parametrize("name, default", [
    ("PORT", 3025),
    ("CONNECT_TIMEOUT", 3),
    ("FAILURE_THRESHOLD", 2),
    ("UNHEALTHY_BACKOFF", 60),
    ("PROBE_INTERVAL", 30),
    ("PROBE_TIMEOUT", 3),
    ("STREAM_IDLE_TIMEOUT", 60),
    ("OLLAMA_TIMEOUT", 120),
    ("OLLAMA_URL", "http://localhost:11434"),
    ("LOG_LEVEL", "info"),
    ("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1"),
    ("GROQ_BASE_URL", "https://api.groq.com/openai/v1"),
    ("TOGETHER_BASE_URL", "https://api.together.xyz/v1"),
    ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    ("GOOGLE_BASE_URL", "https://generativelanguage.googleapis.com/v1beta"),
])
def test_default(name, default):
    assert build_config({})[name] == default


@pytest.mark.parametrize("name", ["OPENROUTER_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY",
                                  "OPENAI_API_KEY", "GOOGLE_API_KEY", "GPU_API_KEY"])
def test_keys_default_to_unset(name):
    assert not build_config({})[name]


def test_default_body_limit_fits_images():
    assert build_config({})["MAX_BODY_BYTES"] >= 10 * 1024 * 1024


def test_given_values_are_parsed():
    config = build_config({"PORT": "8080", "CONNECT_TIMEOUT": "0.5", "FAILURE_THRESHOLD": "3",
                           "GPU_REQUIRE_AUTH": "false", "CORS_ORIGINS": "https://a, https://b"})
    assert (config["PORT"], config["CONNECT_TIMEOUT"], config["FAILURE_THRESHOLD"]) == (
        8080, 0.5, 3)
    assert config["GPU_REQUIRE_AUTH"] is False
    assert config["CORS_ORIGINS"] == ["https://a", "https://b"]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
def test_true_boolean_spellings(value):
    assert build_config({"GPU_REQUIRE_AUTH": value})["GPU_REQUIRE_AUTH"] is True


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "off"])
def test_false_boolean_spellings(value):
    assert build_config({"GPU_REQUIRE_AUTH": value})["GPU_REQUIRE_AUTH"] is False


@pytest.mark.parametrize("name, value", [
    pytest.param("CONNECT_TIMEOUT", "three", id="timeout-not-a-number"),
    pytest.param("OLLAMA_TIMEOUT", "120s", id="timeout-with-unit"),
    pytest.param("PROBE_TIMEOUT", "-1", id="timeout-negative"),
    pytest.param("STREAM_IDLE_TIMEOUT", "0", id="timeout-zero"),
    pytest.param("CONNECT_TIMEOUT", "nan", id="timeout-nan"),
    pytest.param("UNHEALTHY_BACKOFF", "NaN", id="backoff-nan"),
    pytest.param("UNHEALTHY_BACKOFF", "-5", id="backoff-negative"),
    pytest.param("PROBE_INTERVAL", "inf", id="interval-infinite"),
    pytest.param("PORT", "http", id="port-not-a-number"),
    pytest.param("PORT", "70000", id="port-too-large"),
    pytest.param("PORT", "0", id="port-zero"),
    pytest.param("FAILURE_THRESHOLD", "0", id="threshold-zero"),
    pytest.param("FAILURE_THRESHOLD", "2.5", id="threshold-fraction"),
    pytest.param("GPU_REQUIRE_AUTH", "maybe", id="bad-boolean"),
    pytest.param("GPU_REQUIRE_AUTH", "2", id="boolean-number"),
    pytest.param("OLLAMA_URL", "localhost:11434", id="url-without-scheme"),
    pytest.param("GROQ_BASE_URL", "not a url", id="base-url-text"),
    pytest.param("OPENAI_BASE_URL", "ftp://api.openai.com/v1", id="base-url-ftp"),
    pytest.param("GROQ_API_KEY", "gsk_cl\u00e9", id="api-key-non-ascii"),
    pytest.param("GPU_API_KEY", "\u043a\u043b\u044e\u0447", id="gateway-key-non-ascii"),
    pytest.param("LOG_LEVEL", "loud", id="log-level"),
])
def test_invalid_value_raises_config_error_naming_variable(name, value):
    with pytest.raises(ConfigError) as caught:
        build_config({name: value})
    assert name in str(caught.value)


@pytest.mark.parametrize("value", ["http://", "https:///v1"])
def test_base_url_without_host_raises_config_error(value):
    with pytest.raises(ConfigError, match="GROQ_BASE_URL"):
        build_config({"GROQ_BASE_URL": value})


def test_from_env_reads_dotenv_file(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("GROQ_API_KEY=from-dotenv-0123\nPROBE_INTERVAL=45\n")
    config = from_env(environ={}, dotenv_path=str(dotenv))
    assert (config["GROQ_API_KEY"], config["PROBE_INTERVAL"]) == ("from-dotenv-0123", 45)


def test_from_env_real_environment_wins_over_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=4000\nGROQ_API_KEY=from-dotenv-0123\n")
    config = from_env(environ={"PORT": "5000", "GROQ_API_KEY": "from-env-4567"},
                      dotenv_path=str(dotenv))
    assert (config["PORT"], config["GROQ_API_KEY"]) == (5000, "from-env-4567")


def test_from_env_without_dotenv_file_uses_defaults(tmp_path):
    config = from_env(environ={}, dotenv_path=str(tmp_path / "missing.env"))
    assert config["PORT"] == 3025


def test_from_env_validates_dotenv_values(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("CONNECT_TIMEOUT=soon\n")
    with pytest.raises(ConfigError, match="CONNECT_TIMEOUT"):
        from_env(environ={}, dotenv_path=str(dotenv))


def test_from_env_ignores_unrelated_variables():
    config = from_env(environ={"HOME": "/root", "PATH": "/bin", "PORT": "3100"})
    assert config["PORT"] == 3100
    assert "HOME" not in config and "PATH" not in config
