"""The OpenAPI document: valid, served as kept, and in step with the routes."""

import json
import os
import re

import jsonschema_rs
import pytest
import schemathesis

from tests.conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT = os.path.join(REPO, "app", "api", "openapi.json")
# Flask adds these to every route itself; they are not part of the API.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
ERROR_STATUSES = ("400", "401", "404", "413", "415", "422", "429", "502", "503")
KEY = "gateway-key-0123456789"
# A concrete URL for each templated path, one that needs no upstream.
SAMPLE_PATHS = {"/v1/models/{model_id}": "/v1/models/mana/fast-text"}


def load_document():
    with open(DOCUMENT, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def document():
    return load_document()


@pytest.fixture
def app(app_factory):
    return app_factory({"ALIASES_PATH": os.path.join(REPO, "aliases.yaml")})


def openapi_path(rule):
    """Return the OpenAPI form of a Werkzeug rule: ``<path:x>`` and ``<x>`` become ``{x}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def routed_operations(app):
    """Return ``{(METHOD, path)}`` for every route of the app but Flask's static files."""
    return {(method, openapi_path(rule.rule))
            for rule in app.url_map.iter_rules() if rule.endpoint != "static"
            for method in rule.methods - IMPLICIT_METHODS}


def documented_operations(document):
    return {(method.upper(), path)
            for path, item in document["paths"].items() for method in item
            if method in ("get", "post", "put", "patch", "delete")}


@pytest.mark.parametrize("rule, expected", [
    ("/v1/models/<path:model_id>", "/v1/models/{model_id}"),
    ("/v1/things/<int:n>/<name>", "/v1/things/{n}/{name}"),
    ("/health", "/health"),
])
def test_rule_converts_to_openapi_path(rule, expected):
    assert openapi_path(rule) == expected


def test_every_route_is_documented(app, document):
    missing = routed_operations(app) - documented_operations(document)
    assert not missing, f"routes without a documented operation: {sorted(missing)}"


def test_every_documented_operation_has_a_route(app, document):
    stale = documented_operations(document) - routed_operations(app)
    assert not stale, f"documented operations without a route: {sorted(stale)}"


def test_route_check_catches_an_undocumented_route(app, document):
    app.add_url_rule("/v1/secret/<path:x>", "secret", lambda x: "", methods=["DELETE"])
    assert routed_operations(app) - documented_operations(document) == {
        ("DELETE", "/v1/secret/{x}")}


def test_document_is_valid_openapi(document):
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()


@pytest.mark.parametrize("name", sorted(load_document()["components"]["schemas"]))
def test_every_component_schema_compiles(document, name):
    # A ref resolves against the root, so the components travel with the schema.
    schema = dict(document["components"]["schemas"][name], components=document["components"])
    jsonschema_rs.Draft202012Validator(schema)


def test_served_document_is_the_kept_one(app, document):
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == document


def test_served_document_needs_the_key_when_auth_is_on(app_factory, document):
    app = app_factory({"ALIASES_PATH": os.path.join(REPO, "aliases.yaml"),
                       "GPU_API_KEY": "gateway-key-0123"})
    client = app.test_client()
    assert client.get("/openapi.json").status_code == 401
    response = client.get("/openapi.json", headers={"Authorization": "Bearer gateway-key-0123"})
    assert response.get_json() == document


def test_open_paths_need_no_security(document):
    for path in ("/health", "/metrics"):
        assert document["paths"][path]["get"]["security"] == []


def test_auth_schemes_are_the_three_the_gateway_reads(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert (schemes["apiKeyHeader"]["in"], schemes["apiKeyHeader"]["name"]) == \
        ("header", "X-API-Key")
    assert (schemes["apiKeyQuery"]["in"], schemes["apiKeyQuery"]["name"]) == \
        ("query", "api_key")
    # Optional: the empty requirement means "no key" is allowed (auth off by default).
    assert {} in document["security"]


def test_chat_documents_every_error_status_and_both_media_types(document):
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(ERROR_STATUSES) <= set(responses)
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "X-Mana-LLM-Resolved" in responses["200"]["headers"]


def test_error_schema_is_the_two_envelopes(document):
    error = document["components"]["schemas"]["Error"]
    validator = jsonschema_rs.Draft202012Validator({**error,
                                                    "components": document["components"]})
    good = {"error": {"message": "m", "type": "invalid_request", "code": "invalid_request",
                      "param": None},
            "detail": {"kind": "invalid_request", "message": "m"}}
    assert validator.is_valid(good)
    assert not validator.is_valid({"error": good["error"]})
    assert not validator.is_valid({"detail": good["detail"], "error": {"message": "m"}})


def credentials(scheme, key):
    """Return ``(headers, query)`` presenting ``key`` the way a security scheme says."""
    if scheme["type"] == "http" and scheme["scheme"].lower() == "bearer":
        return {"Authorization": f"Bearer {key}"}, {}
    if scheme["type"] == "apiKey" and scheme["in"] == "header":
        return {scheme["name"]: key}, {}
    if scheme["type"] == "apiKey" and scheme["in"] == "query":
        return {}, {scheme["name"]: key}
    raise AssertionError(f"the gateway reads no such scheme: {scheme}")


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), SAMPLE_PATHS.get(path, path), \
                operation.get("security", document["security"])


@pytest.fixture
def authed_client(app_factory):
    # Ollama on a closed port: listing models fails at once, no upstream is reached.
    return app_factory({"ALIASES_PATH": os.path.join(REPO, "aliases.yaml"), "GPU_API_KEY": KEY,
                        "OLLAMA_URL": f"http://127.0.0.1:{free_port()}"}).test_client()


def call(client, method, path, headers=None, query=None):
    # An empty JSON body: rejected by validation (400) after auth, never sent upstream.
    return client.open(path, method=method, headers=headers or {}, query_string=query or {},
                       json={} if method == "POST" else None)


@pytest.mark.parametrize("scheme_name", ["bearer", "apiKeyHeader", "apiKeyQuery"])
def test_every_documented_scheme_is_accepted(authed_client, document, scheme_name):
    headers, query = credentials(document["components"]["securitySchemes"][scheme_name], KEY)
    for method, path, security in operations(document):
        response = call(authed_client, method, path, headers, query)
        assert response.status_code != 401, f"{method} {path} refused {scheme_name}"
        assert response.status_code < 500, f"{method} {path}: {response.status_code}"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}],
                         ids=["no-key", "wrong-key"])
def test_documented_open_paths_are_the_only_open_ones(authed_client, document, headers):
    for method, path, security in operations(document):
        response = call(authed_client, method, path, headers)
        if security == []:
            assert response.status_code != 401, f"{method} {path} is documented as open"
        else:
            assert response.status_code == 401, f"{method} {path} is documented as secured"
            assert response.get_json()["detail"]["kind"] == "unauthorized"
