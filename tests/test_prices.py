"""The price table: validation, per-model and per-provider prices, unpriced entries."""

import os

import pytest

from app.prices import PricesConfigError, load_prices, parse_prices
from app.routing.aliases import load_aliases
from tests.conftest import REPO

DOC = {"defaults": {"ollama": {"prompt": 0, "completion": 0},
                    "groq": {"prompt": 1, "completion": 2}},
       "models": {"groq/cheap": {"prompt": 0.5, "completion": 0.25},
                  "openrouter/anthropic/claude-3-haiku": {"prompt": 0.25, "completion": 1.25}}}


def test_a_listed_model_uses_its_own_price():
    prices = parse_prices(DOC)
    assert prices.cost("groq", "cheap", 1_000_000, 2_000_000) == pytest.approx(1.0)
    assert prices.cost("openrouter", "anthropic/claude-3-haiku", 400, 200) == \
        pytest.approx((0.25 * 400 + 1.25 * 200) / 1e6)


def test_another_model_uses_its_provider_default_and_ollama_is_free():
    prices = parse_prices(DOC)
    assert prices.cost("groq", "other", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert prices.cost("ollama", "qwen2.5:7b", 10**6, 10**6) == 0


def test_unknown_prices_count_as_zero_and_are_listed():
    prices = parse_prices(DOC)
    assert prices.cost("openai", "gpt-4o", 10**6, 10**6) == 0
    assert prices.unpriced(["openai/gpt-4o", "groq/x", "openai/gpt-4o", "ollama/m"]) == \
        ["openai/gpt-4o"]


@pytest.mark.parametrize("document, complaint", [
    ({"default": {}}, "mapping of 'defaults' and 'models'"),
    ({"defaults": {"nope": {"prompt": 0, "completion": 0}}}, "unknown provider"),
    ({"models": {"gpt-4o": {"prompt": 0, "completion": 0}}}, "must be 'provider/model'"),
    ({"models": {"openai/x": {"prompt": 1}}}, "exactly 'prompt' and 'completion'"),
    ({"models": {"openai/x": {"prompt": -1, "completion": 0}}}, "prompt must be a number"),
    ({"models": {"openai/x": {"prompt": "1", "completion": 0}}}, "prompt must be a number"),
])
def test_bad_files_are_rejected_naming_the_rule(document, complaint):
    with pytest.raises(PricesConfigError) as raised:
        parse_prices(document)
    assert complaint in str(raised.value)


def test_round_trip_through_the_snapshot_document():
    prices = parse_prices(DOC)
    assert parse_prices(prices.to_doc()) == prices


def test_the_shipped_price_file_prices_every_shipped_chain_entry():
    prices = load_prices(os.path.join(REPO, "prices.yaml"))
    table = load_aliases(os.path.join(REPO, "aliases.yaml"))
    assert prices.unpriced(e.label for a in table.aliases.values() for e in a.chain) == []
    assert prices.price("ollama", "anything") == (0.0, 0.0)


def test_no_path_means_no_prices():
    assert load_prices("").cost("openai", "gpt-4o", 10**6, 10**6) == 0
