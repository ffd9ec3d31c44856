"""schemathesis against the live gateway under gunicorn, every provider a fake upstream.

Each documented operation gets a bounded, derandomized run of generated
requests (valid and invalid ones): no answer may be a 5xx, every error
must be JSON in both envelopes, and every success must match the
document (status, media type, headers, body). The fakes answer anything,
so a failure here is the gateway's, never an upstream's.
"""

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance)

from tests.conftest import REPO, Gunicorn, provider_env
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

DOCUMENT = os.path.join(REPO, "app", "api", "openapi.json")
PROVIDERS = ("ollama", "groq", "openrouter", "together", "openai", "google")
# Generated requests per operation, on top of the explicit and coverage
# cases: the module takes about 25 s on a 2-core box at load 13.
EXAMPLES = 50


# Random text is almost never a model string the router would route: steer
# generation to the forms callers use (aliases, direct, bare, odd cases),
# with arbitrary text in the model part, so the walk and the headers it
# sets get fuzzed and not only the first check.
PRINTABLE = st.text(st.characters(categories=("L", "M", "N", "P", "S", "Zs")), max_size=40)
MODEL_STRINGS = st.one_of(
    st.builds("{}/{}".format, st.sampled_from(PROVIDERS + ("Groq", "OLLAMA", "mana", "nope")),
              PRINTABLE),
    PRINTABLE,
    st.sampled_from(["mana/fast-text", "mana/vision", "mana/nope", "", "groq/", "/gemma3:4b",
                     "Ollama/gemma3:4b", "mana/fast-text ", "groq/模型", "openai/a b"]),
    st.text(max_size=40),
)
schemathesis.openapi.format("model-string", MODEL_STRINGS)
schema = schemathesis.openapi.from_path(DOCUMENT)
# Valid bodies only: an invalid one stops at validation, before the router.
routed = schemathesis.openapi.from_path(DOCUMENT).include(
    operation_id=["createChatCompletion", "createEmbeddings", "getModel"])
routed.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])


def two_envelopes(ctx, response, case):
    """Check that an error is JSON with both envelopes, naming the same kind."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), \
        f"error {response.status_code} is {content_type!r}, not JSON: {response.text[:200]!r}"
    body = json.loads(response.content)
    error, detail = body.get("error"), body.get("detail")
    assert isinstance(error, dict) and isinstance(detail, dict), f"not two envelopes: {body}"
    for envelope, field in ((error, "message"), (error, "type"), (error, "code"),
                            (detail, "kind"), (detail, "message")):
        assert isinstance(envelope.get(field), str), f"{field!r} missing or not text: {body}"
    assert error["type"] == error["code"] == detail["kind"], f"kinds differ: {body}"
    return None


def resolved_is_the_model(ctx, response, case):
    """Check that X-Mana-LLM-Resolved names the model the body (or every chunk) carries."""
    if response.status_code != 200 or case.method.upper() != "POST":
        return None
    resolved = response.headers["x-mana-llm-resolved"][0]
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        models = {json.loads(event).get("model") for event in events} - {None}
        assert models <= {resolved}, f"chunks name {models}, header {resolved!r}"
        return None
    assert json.loads(response.content)["model"] == resolved
    return None


CHECKS = [not_a_server_error, two_envelopes, resolved_is_the_model, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Fakes for every provider and one gateway (two workers) in front of them."""
    fakes = {name: FakeUpstream(name=name).start() for name in PROVIDERS}
    env = provider_env(fakes)
    env["ALIASES_PATH"] = os.path.join(REPO, "aliases.yaml")
    # A cap never reached (requests come one at a time): /v1/health then shows
    # the capped provider's fields, and every call takes and gives back a slot.
    env["OLLAMA_MAX_CONCURRENCY"] = "64"
    server = Gunicorn(env, tmp_path_factory.mktemp("fuzz") / "gateway.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for fake in fakes.values():
            fake.stop()


# Deterministic (CI sees the same cases every run); no shrinking, so a
# failure costs seconds, and schemathesis prints the failing request as curl.
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))


@schema.parametrize()
@BOUNDED
def test_gateway_keeps_its_contract(case, live):
    case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=30)


@routed.parametrize()
@routed.given(model=MODEL_STRINGS)
@BOUNDED
def test_any_model_string_gets_an_answer_or_a_clean_error(case, model, live):
    if case.path_parameters is not None and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = model or "mana/fast-text"
    elif isinstance(case.body, dict):
        case.body["model"] = model
    case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=30)
