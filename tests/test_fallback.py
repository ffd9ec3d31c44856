"""The chain walk (SPEC §6): skips, retryable failures, stops, 404s, 429s, exhaustion,
bugs of ours, and the books a committed stream keeps."""

import pytest

from app import errors
from app.routing.aliases import Entry, Route
from app.routing.breaker import HealthCache
from app.routing.fallback import ChainWalker
from app.streaming import CommittedStream, prime

BACKOFF = 60.0
PROVIDERS = ("ollama", "groq", "openrouter", "openai")


class FakeProvider:
    def __init__(self, name, configured=True):
        self.name = name
        self.configured = configured


class StubInFlight:
    """Pair every begin with its end."""

    def __init__(self):
        self.open = {}
        self.started = 0

    def begin(self, provider):
        self.started += 1
        self.open[self.started] = provider
        return self.started  # the "call" the walker passes down

    def end(self, token):
        assert token in self.open
        del self.open[token]

    def watch(self, token, caller):
        self.watched = (token, caller)

    def unwatch(self, token):
        assert self.watched[0] == token
        self.watched = None


class RecordingRecorder:
    def __init__(self):
        self.successes, self.errors, self.chains, self.tokens_seen = [], [], [], []
        self.payers = []

    def llm_success(self, entry, streaming, seconds):
        self.successes.append(entry)

    def llm_error(self, entry, asked, reason):
        self.errors.append((entry, asked, reason))

    def tokens(self, entry, usage, caller=None):
        self.tokens_seen.append((entry, usage))
        self.payers.append(caller)

    def chain_done(self, attempts, entries, alias, served):
        self.chains.append((list(attempts), entries, alias, served))


class Script:
    """The per-test ``call``: each provider answers or raises what the test says."""

    def __init__(self, **outcomes):
        self.outcomes = outcomes
        self.called = []
        self.calls = []

    def __call__(self, provider, entry, call):
        self.called.append(entry.provider)
        self.calls.append(call)
        outcome = self.outcomes[entry.provider]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def health(clock):
    return HealthCache(PROVIDERS, threshold=2, backoff=BACKOFF, clock=clock,
                       wall=lambda: 1_700_000_000.0 + clock.now)


@pytest.fixture
def inflight():
    return StubInFlight()


@pytest.fixture
def recorder():
    return RecordingRecorder()


def make_walker(health, inflight, recorder, unconfigured=()):
    providers = {name: FakeProvider(name, name not in unconfigured) for name in PROVIDERS}
    return ChainWalker(providers, health, inflight, recorder)


@pytest.fixture
def walker(health, inflight, recorder):
    return make_walker(health, inflight, recorder)


def chain(*providers):
    return [Entry(name, f"model-{name}") for name in providers]


def walk(walker, entries, call, alias="mana/test", streaming=False, **kw):
    return walker.walk(Route(alias, alias, tuple(entries)), call, streaming=streaming, **kw)


def trip(health, provider):
    health.record_failure(provider, "down")
    health.record_failure(provider, "down")


def attempts_of(recorder):
    (attempts, _, _, _), = recorder.chains
    return [(a.model, a.reason) for a in attempts]


def test_first_healthy_entry_answers(walker, recorder):
    call = Script(ollama="answer", groq="unused")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert (outcome.result, outcome.entry.provider, outcome.attempts) == ("answer", "ollama", [])
    assert call.called == ["ollama"]
    assert recorder.successes == [Entry("ollama", "model-ollama")]


def test_unconfigured_provider_is_skipped(health, inflight, recorder):
    walker = make_walker(health, inflight, recorder, unconfigured=("ollama",))
    call = Script(groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert outcome.result == "answer"
    assert call.called == ["groq"]
    assert attempts_of(recorder) == [("ollama/model-ollama", "unconfigured")]


def test_provider_unknown_to_the_gateway_is_skipped_as_unconfigured(walker, recorder):
    call = Script(groq="answer")
    walk(walker, [Entry("nosuch", "m")] + chain("groq"), call)
    assert attempts_of(recorder) == [("nosuch/m", "unconfigured")]


def test_tripped_provider_is_skipped(walker, health, recorder):
    trip(health, "ollama")
    call = Script(groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert outcome.result == "answer"
    assert call.called == ["groq"]
    assert attempts_of(recorder) == [("ollama/model-ollama", "cache-unhealthy")]


@pytest.mark.parametrize("error, reason", [
    (errors.UpstreamUnavailable("ollama: connection refused", reason="ConnectionError"),
     "ConnectionError"),
    (errors.UpstreamUnavailable("ollama: connect timeout", reason="ConnectTimeout"),
     "ConnectTimeout"),
    (errors.UpstreamError("ollama failed with HTTP 500", reason="HTTP 500"), "HTTP 500"),
    (errors.UpstreamError("ollama: malformed JSON", reason="malformed-response"),
     "malformed-response"),
], ids=["connection-refused", "connect-timeout", "http-500", "malformed"])
def test_retryable_error_falls_back_and_counts_a_failure(walker, health, recorder, error,
                                                         reason):
    call = Script(ollama=error, groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert (outcome.result, outcome.entry.provider) == ("answer", "groq")
    assert attempts_of(recorder) == [("ollama/model-ollama", reason)]
    state = health.snapshot()["ollama"]
    assert state["consecutive_failures"] == 1
    assert state["last_error"] == error.message


def test_answering_provider_is_marked_healthy(walker, health):
    health.record_failure("groq", "blip")
    walk(walker, chain("groq"), Script(groq="answer"))
    assert health.snapshot()["groq"]["consecutive_failures"] == 0


def test_repeated_retryable_failures_trip_the_provider(walker, health):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"), groq="answer")
    walk(walker, chain("ollama", "groq"), call)
    walk(walker, chain("ollama", "groq"), call)
    walk(walker, chain("ollama", "groq"), call)
    assert call.called == ["ollama", "groq", "ollama", "groq", "groq"]


def test_upstream_404_falls_back_without_marking_provider_failed(walker, health, recorder):
    call = Script(ollama=errors.UpstreamModelNotFound("model not pulled"), groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert outcome.result == "answer"
    assert attempts_of(recorder) == [("ollama/model-ollama", "model-not-found")]
    state = health.snapshot()["ollama"]
    assert (state["status"], state["consecutive_failures"]) == ("healthy", 0)


def test_every_entry_404_is_model_not_found(walker):
    call = Script(ollama=errors.UpstreamModelNotFound("no"),
                  groq=errors.UpstreamModelNotFound("no"))
    with pytest.raises(errors.ModelNotFound) as caught:
        walk(walker, chain("ollama", "groq"), call)
    assert caught.value.status == 404
    assert caught.value.kind == "model_not_found"


@pytest.mark.parametrize("error", [
    errors.UpstreamInvalidRequest("context length exceeded", reason="HTTP 400"),
    errors.UpstreamAuthError("groq refused the gateway's credentials (401)"),
    errors.Blocked("refused on safety grounds"),
], ids=["upstream-400", "upstream-401", "blocked"])
def test_non_retryable_error_stops_the_walk(walker, health, recorder, error):
    call = Script(ollama=error, groq="unused")
    with pytest.raises(type(error)) as caught:
        walk(walker, chain("ollama", "groq"), call)
    assert caught.value is error
    assert call.called == ["ollama"]
    state = health.snapshot()["ollama"]
    assert (state["status"], state["consecutive_failures"], state["last_error"]) == (
        "healthy", 0, None)


CANNOT = errors.CapabilityError("ollama/gemma3:4b does not support tools", param="tools")


def test_an_alias_entry_that_cannot_serve_the_request_is_skipped(walker, health, recorder):
    call = Script(ollama=CANNOT, groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert (outcome.result, outcome.entry.provider) == ("answer", "groq")
    assert attempts_of(recorder) == [("ollama/model-ollama", "capability")]
    state = health.snapshot()["ollama"]
    assert (state["status"], state["consecutive_failures"]) == ("healthy", 0)


def test_a_model_named_directly_that_cannot_serve_it_is_a_capability_error(walker):
    call = Script(ollama=CANNOT)
    with pytest.raises(errors.CapabilityError) as caught:
        walker.walk(Route("ollama/model-ollama", None, tuple(chain("ollama"))), call)
    assert caught.value is CANNOT


def test_an_alias_no_entry_of_which_can_serve_it_is_a_capability_error(
        health, inflight, recorder):
    walker = make_walker(health, inflight, recorder, unconfigured=("openai",))
    other = errors.CapabilityError("groq/model-groq cannot either")
    call = Script(ollama=CANNOT, groq=other)
    with pytest.raises(errors.CapabilityError) as caught:
        walk(walker, chain("ollama", "openai", "groq"), call)
    assert caught.value is CANNOT
    assert (caught.value.status, caught.value.kind) == (400, "capability")


def test_entries_that_cannot_serve_it_beside_ones_that_failed_is_exhaustion(walker):
    call = Script(ollama=CANNOT, groq=errors.UpstreamError("HTTP 500", reason="HTTP 500"))
    with pytest.raises(errors.ChainExhausted) as caught:
        walk(walker, chain("ollama", "groq"), call)
    assert caught.value.attempts == [
        {"model": "ollama/model-ollama", "reason": "capability"},
        {"model": "groq/model-groq", "reason": "HTTP 500"}]


def test_non_retryable_error_ends_a_half_open_trial(walker, health, clock):
    trip(health, "ollama")
    clock.advance(BACKOFF)
    call = Script(ollama=errors.UpstreamInvalidRequest("bad request"))
    with pytest.raises(errors.UpstreamInvalidRequest):
        walk(walker, chain("ollama"), call)
    # The caller's own error says nothing about health: the next caller gets a trial.
    assert health.admit("ollama") is True


def test_rate_limited_entry_cools_down_and_next_answers(walker, health, clock, recorder):
    call = Script(ollama=errors.RateLimited("slow down", retry_after=2), groq="answer")
    outcome = walk(walker, chain("ollama", "groq"), call)
    assert outcome.result == "answer"
    assert attempts_of(recorder) == [("ollama/model-ollama", "rate-limited")]
    assert health.snapshot()["ollama"]["consecutive_failures"] == 0
    assert health.admit("ollama") is False
    clock.advance(2)
    assert health.admit("ollama") is True


def test_all_attempts_rate_limited_is_chain_rate_limited(health, inflight, recorder):
    walker = make_walker(health, inflight, recorder, unconfigured=("openai",))
    call = Script(ollama=errors.RateLimited("slow", retry_after=2),
                  groq=errors.RateLimited("slow", retry_after=5))
    with pytest.raises(errors.ChainRateLimited) as caught:
        walk(walker, chain("ollama", "openai", "groq"), call)
    error = caught.value
    assert (error.status, error.kind) == (429, "rate_limit")
    assert error.headers() == {"x-should-retry": "false", "Retry-After": "2"}


@pytest.fixture
def everything_down(health, inflight, recorder, clock):
    """openai unconfigured, groq tripped at t=0, openrouter at t=20; now t=30."""
    trip(health, "groq")
    clock.advance(20)
    trip(health, "openrouter")
    clock.advance(10)
    walker = make_walker(health, inflight, recorder, unconfigured=("openai",))
    call = Script(ollama=errors.UpstreamUnavailable("refused", reason="ConnectionError"))
    with pytest.raises(errors.ChainExhausted) as caught:
        walk(walker, chain("openai", "groq", "ollama", "openrouter"), call)
    return caught.value


def test_everything_down_is_503_with_one_attempt_per_entry(everything_down):
    assert (everything_down.status, everything_down.kind) == (503, "no_healthy_provider")
    assert everything_down.body()["error"]["attempts"] == [
        {"model": "openai/model-openai", "reason": "unconfigured"},
        {"model": "groq/model-groq", "reason": "cache-unhealthy"},
        {"model": "ollama/model-ollama", "reason": "ConnectionError"},
        {"model": "openrouter/model-openrouter", "reason": "cache-unhealthy"},
    ]


def test_everything_down_tells_sdks_not_to_retry(everything_down):
    assert everything_down.headers()["x-should-retry"] == "false"


def test_everything_down_retry_after_is_shortest_remaining_backoff(everything_down):
    # groq's backoff ends at 60 and openrouter's at 80; it is now 30.
    assert everything_down.headers()["Retry-After"] == "30"


def test_everything_down_is_not_rate_limited(everything_down):
    assert not isinstance(everything_down, errors.ChainRateLimited)


def test_chain_done_receives_the_attempts(walker, health, recorder):
    trip(health, "groq")
    entries = chain("groq", "ollama", "openrouter")
    call = Script(ollama=errors.UpstreamError("HTTP 502", reason="HTTP 502"),
                  openrouter="answer")
    walk(walker, entries, call, alias="mana/fast-text")
    (attempts, seen_entries, alias, served), = recorder.chains
    assert [(a.model, a.reason, a.index) for a in attempts] == [
        ("groq/model-groq", "cache-unhealthy", 0), ("ollama/model-ollama", "HTTP 502", 1)]
    assert (seen_entries, alias, served) == (tuple(entries), "mana/fast-text", entries[2])


def test_chain_done_is_told_when_the_chain_is_exhausted(walker, recorder):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"))
    with pytest.raises(errors.ChainExhausted):
        walk(walker, chain("ollama"), call)
    (attempts, _, _, served), = recorder.chains
    assert [(a.model, a.reason) for a in attempts] == [("ollama/model-ollama", "HTTP 500")]
    assert served is None


def test_failed_calls_are_recorded_with_what_was_asked(walker, recorder):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"), groq="answer")
    walker.walk(Route("groq/x", None, tuple(chain("ollama", "groq"))), call)
    assert recorder.errors == [(Entry("ollama", "model-ollama"), "groq/x", "HTTP 500")]


def test_failed_calls_of_an_alias_are_recorded_with_the_alias(walker, recorder):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"), groq="answer")
    walk(walker, chain("ollama", "groq"), call, alias="mana/fast-text")
    assert recorder.errors == [(Entry("ollama", "model-ollama"), "mana/fast-text", "HTTP 500")]


def test_every_started_call_is_ended_in_the_registry(walker, inflight):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"),
                  groq=errors.Blocked("no"))
    with pytest.raises(errors.Blocked):
        walk(walker, chain("ollama", "groq"), call)
    assert inflight.started == 2
    assert inflight.open == {}


def test_each_call_gets_its_own_registration_passed_down(walker, inflight):
    call = Script(ollama=errors.UpstreamError("HTTP 500", reason="HTTP 500"), groq="answer")
    walk(walker, chain("ollama", "groq"), call)
    assert call.calls == [1, 2]


# -- only our errors are the provider's: a bug of ours is not -----------------------------

@pytest.mark.parametrize("bug", [KeyError("choices"), TypeError("'str' object"),
                                 AttributeError("x"), IndexError("list"), ValueError("v")])
def test_a_bug_of_ours_propagates_and_is_not_a_provider_failure(
        walker, health, recorder, inflight, bug):
    call = Script(ollama=bug, groq="unused")
    with pytest.raises(type(bug)):
        walk(walker, chain("ollama", "groq"), call)
    assert call.called == ["ollama"]
    state = health.snapshot()["ollama"]
    assert (state["status"], state["consecutive_failures"], state["last_error"]) == (
        "healthy", 0, None)
    assert recorder.errors == []
    assert inflight.open == {}


def test_a_bug_of_ours_in_a_half_open_trial_ends_the_trial(walker, health, clock):
    trip(health, "ollama")
    clock.advance(BACKOFF)
    with pytest.raises(KeyError):
        walk(walker, chain("ollama"), Script(ollama=KeyError("x")))
    # Nothing was learnt about the provider: the next caller gets the trial.
    assert health.admit("ollama") is True
    assert health.snapshot()["ollama"]["status"] == "unhealthy"


# -- a committed stream keeps its own books -----------------------------------------------

def chunk(text=None, finish=None, usage=None):
    out = {"choices": [{"index": 0, "delta": {"content": text} if text else {},
                        "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return out


def upstream(*items):
    """A provider's chunk generator: chunks, and an error to raise where given."""
    closed = []

    def generate():
        try:
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            closed.append(True)

    return generate(), closed


def stream_walk(walker, gen):
    return walk(walker, chain("ollama"), lambda p, e, c: prime(gen), streaming=True)


def test_a_stream_that_ends_cleanly_is_a_success(walker, health, recorder):
    health.record_failure("ollama", "blip")
    gen, closed = upstream(chunk("hi"), chunk(finish="stop", usage={"prompt_tokens": 3}))
    stream = stream_walk(walker, gen).result
    assert isinstance(stream, CommittedStream)
    assert health.snapshot()["ollama"]["consecutive_failures"] == 1  # not yet
    assert [c["choices"][0]["finish_reason"] for c in stream] == [None, "stop"]
    assert health.snapshot()["ollama"]["consecutive_failures"] == 0
    assert recorder.tokens_seen == [(Entry("ollama", "model-ollama"), {"prompt_tokens": 3})]
    assert closed == [True]


def test_a_committed_stream_charges_its_tokens_to_the_payer(walker, recorder):
    gen, _ = upstream(chunk("hi"), chunk(finish="stop", usage={"prompt_tokens": 3}))
    stream = walk(walker, chain("ollama"), lambda p, e, c: prime(gen), streaming=True,
                  payer="the caller").result
    list(stream)
    assert recorder.payers == ["the caller"]


def test_a_stream_that_fails_after_commit_counts_against_its_provider(walker, health,
                                                                      recorder):
    failure = errors.UpstreamError("dropped", reason="closed-early")
    gen, closed = upstream(chunk("hi"), failure)
    stream = stream_walk(walker, gen).result
    with pytest.raises(errors.UpstreamError):
        list(stream)
    assert health.snapshot()["ollama"]["consecutive_failures"] == 1
    assert recorder.errors == [(Entry("ollama", "model-ollama"), "mana/test", "closed-early")]
    assert closed == [True]


def test_a_stream_the_caller_leaves_is_closed_and_says_nothing(walker, health, recorder):
    gen, closed = upstream(chunk("hi"), chunk("more"), chunk(finish="stop"))
    stream = stream_walk(walker, gen).result
    next(iter(stream))
    stream.close()
    assert closed == [True]
    state = health.snapshot()["ollama"]
    assert (state["consecutive_failures"], recorder.errors) == (0, [])


def test_a_committed_stream_is_watched_for_its_caller_until_it_ends(walker, inflight):
    gen, closed = upstream(chunk("hi"), chunk(finish="stop"))
    stream = walker.walk(Route("m", None, tuple(chain("ollama"))), lambda p, e, c: prime(gen),
                         streaming=True, client="the caller's socket").result
    assert inflight.watched == (1, "the caller's socket")
    list(stream)
    assert inflight.watched is None


def test_a_failed_call_is_logged_with_its_reason_and_message(walker, caplog):
    def ask(provider, entry, call):
        if entry.provider == "ollama":
            raise errors.UpstreamError("ollama: stream line longer than 1 MiB",
                                       reason="too-large")
        return "ok"

    with caplog.at_level("INFO", logger="app.routing.fallback"):
        walk(walker, chain("ollama", "groq"), ask)
    assert "ollama/model-ollama failed (too-large): ollama: stream line longer than 1 MiB" \
        in caplog.text
