"""CORS: preflights for allowed origins, Vary on every answer, never credentials."""

import pytest

from app.cors import allowed_headers

CHAT = "/v1/chat/completions"


@pytest.fixture
def client_for(app_factory):
    def build(origins):
        return app_factory({"CORS_ORIGINS": origins}).test_client()
    return build


def preflight(client, origin, headers=None):
    asked = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if headers is not None:
        asked["Access-Control-Request-Headers"] = headers
    return client.options(CHAT, headers=asked)


def test_preflight_allows_the_headers_the_browser_asks_for(client_for):
    response = preflight(client_for("https://app.example"), "https://app.example",
                         "content-type, x-stainless-lang, OpenAI-Beta, x-stainless-arch")
    assert response.status_code == 204
    allowed = response.headers["Access-Control-Allow-Headers"].split(", ")
    assert {"content-type", "x-stainless-lang", "openai-beta", "x-stainless-arch",
            "authorization", "x-api-key"} <= set(allowed)
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert {"Origin", "Access-Control-Request-Headers"} <= set(response.vary)


@pytest.mark.parametrize("asked, absent", [
    ("x-ok, x bad, x-fine", "x bad"),
    ("x-ok, x-bad\u00e9, x-fine", "x-bad\u00e9"),
    ("x-ok, (x), x-fine", "(x)"),
    ("x-ok, " + "y" * 65 + ", x-fine", "y" * 65),
], ids=["space", "non-ascii", "parens", "too-long"])
def test_requested_header_that_is_not_a_token_is_dropped(asked, absent):
    allowed = allowed_headers(asked).split(", ")
    assert "x-ok" in allowed and "x-fine" in allowed and absent not in allowed


def test_requested_headers_are_bounded():
    allowed = allowed_headers(", ".join(f"x-h{i}" for i in range(1000))).split(", ")
    assert len(allowed) <= 4 + 32


def test_without_requested_headers_ours_are_allowed():
    assert allowed_headers(None) == "authorization, content-type, x-api-key, x-request-id"


@pytest.mark.parametrize("method", ["options", "post", "get"])
def test_refused_origin_gets_vary_and_no_cors_headers(client_for, method):
    client = client_for("https://app.example")
    response = getattr(client, method)(CHAT, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Origin" in response.vary
    assert not [h for h in response.headers.keys() if h.startswith("Access-Control-")]


def test_answer_without_origin_still_varies_on_it(client_for):
    assert "Origin" in client_for("https://app.example").get("/health").vary


@pytest.mark.parametrize("origins", ["*", "https://app.example, *"])
def test_wildcard_answers_star_and_never_credentials(client_for, origins):
    response = preflight(client_for(origins), "https://any.example", "authorization")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_allowed_origin_is_echoed_on_answers(client_for):
    response = client_for("https://app.example").get("/health",
                                                     headers={"Origin": "https://app.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_no_cors_configured_adds_nothing(client_for):
    response = preflight(client_for(""), "https://app.example", "content-type")
    assert not [h for h in response.headers.keys() if h.startswith("Access-Control-")]
