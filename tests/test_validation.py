"""Request validation (SPEC §3) and body parsing (SPEC §8): always a 4xx, never a crash."""

import copy
import io

import flask
import pytest

from app import errors
from app.validation import chat_request, embeddings_request, parse_json_body, read_body

USER = {"role": "user", "content": "hi"}


def chat(**fields):
    body = {"model": "mana/fast-text", "messages": [dict(USER)]}
    body.update(fields)
    return body


def rejected(body, validate=chat_request):
    with pytest.raises(errors.InvalidRequest) as caught:
        validate(body)
    assert caught.value.status == 400
    return caught.value


# -- chat_request: one rejection per rule --------------------------------------------------

@pytest.mark.parametrize("messages", [[], None, "hi", {"role": "user"}, ["hi"]],
                         ids=["empty", "missing", "string", "object", "list-of-strings"])
def test_bad_messages_are_rejected(messages):
    body = chat(messages=messages)
    if messages is None:
        del body["messages"]
    assert rejected(body).param == "messages"


@pytest.mark.parametrize("role", ["bot", "", None, "USER", 1])
def test_bad_role_is_rejected(role):
    assert rejected(chat(messages=[{"role": role, "content": "hi"}])).param == "messages"


@pytest.mark.parametrize("content", [5, True, {"text": "hi"}, 1.5])
def test_content_of_wrong_type_is_rejected(content):
    error = rejected(chat(messages=[{"role": "user", "content": content}]))
    assert error.param == "messages[0].content"


@pytest.mark.parametrize("part", [
    "hi",
    {"type": "text"},
    {"type": "text", "text": 5},
    {"type": "image_url"},
    {"type": "image_url", "image_url": {}},
    {"type": "image_url", "image_url": {"url": 5}},
    {"type": "image_url", "image_url": 5},
    {"type": "audio", "audio": "..."},
    {"text": "no type"},
], ids=["string", "text-missing", "text-number", "image-missing", "image-no-url",
        "image-url-number", "image-number", "unknown-type", "no-type"])
def test_bad_content_part_is_rejected(part):
    body = chat(messages=[USER, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                             part]}])
    assert rejected(body).param == "messages[1].content"


@pytest.mark.parametrize("name, value", [
    ("temperature", -0.1), ("temperature", 2.1), ("temperature", "0.5"),
    ("temperature", True), ("top_p", 1.5), ("top_p", -0.01),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", "5"), ("max_tokens", True),
    ("max_tokens", 1.5),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.01),
    ("presence_penalty", -2.5), ("presence_penalty", 2.01),
])
def test_number_out_of_range_or_wrong_type_is_rejected(name, value):
    assert rejected(chat(**{name: value})).param == name


@pytest.mark.parametrize("name, value", [
    ("temperature", 0), ("temperature", 2), ("top_p", 0), ("top_p", 1), ("max_tokens", 1),
    ("frequency_penalty", -2), ("presence_penalty", 2),
])
def test_number_at_range_edge_is_accepted(name, value):
    assert chat_request(chat(**{name: value}))[name] == value


@pytest.mark.parametrize("stop", [5, ["a", 1], {"a": "b"}, True])
def test_stop_of_wrong_type_is_rejected(stop):
    assert rejected(chat(stop=stop)).param == "stop"


@pytest.mark.parametrize("fmt", [{"type": "xml"}, "json", {"json_schema": {}},
                                 {"type": "json_schema"}, {"type": "json_schema",
                                                           "json_schema": "schema"}],
                         ids=["unknown-type", "string", "no-type", "schema-missing",
                              "schema-not-object"])
def test_bad_response_format_is_rejected(fmt):
    assert rejected(chat(response_format=fmt)).param == "response_format"


@pytest.mark.parametrize("tools", [
    {"type": "function"},
    ["get_weather"],
    [{"type": "function"}],
    [{"type": "retrieval", "function": {"name": "x"}}],
    [{"type": "function", "function": "get_weather"}],
    [{"type": "function", "function": {"name": 5}}],
    [{"type": "function", "function": {"description": "no name"}}],
], ids=["not-a-list", "string", "no-function", "wrong-type", "function-string",
        "name-number", "name-missing"])
def test_malformed_tools_are_rejected(tools):
    assert rejected(chat(tools=tools)).param == "tools"


TOOLS = [{"type": "function", "function": {"name": "look"}}]


def test_tool_choice_of_wrong_type_is_rejected():
    assert rejected(chat(tools=TOOLS, tool_choice=5)).param == "tool_choice"


def test_tool_choice_of_wrong_type_is_rejected_without_tools():
    assert rejected(chat(tool_choice=5)).param == "tool_choice"


@pytest.mark.parametrize("stream", ["true", 1, 0, [True], {"on": True}])
def test_stream_not_bool_is_rejected(stream):
    assert rejected(chat(stream=stream)).param == "stream"


def test_stream_options_not_object_is_rejected():
    assert rejected(chat(stream=True, stream_options=True)).param == "stream_options"


@pytest.mark.parametrize("flag", ["yes", 1, None, {}])
def test_include_usage_not_bool_is_rejected(flag):
    body = chat(stream=True, stream_options={"include_usage": flag})
    assert rejected(body).param == "stream_options"


@pytest.mark.parametrize("encoding", [{}, [], 0, False, "", "FLOAT"])
def test_encoding_format_not_float_or_base64_is_rejected(encoding):
    body = {"model": "x", "input": "hi", "encoding_format": encoding}
    assert rejected(body, embeddings_request).param == "encoding_format"


def test_valid_request_with_every_field_passes_unchanged():
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0="}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "look", "arguments": "{\"q\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        temperature=0.7, top_p=0.9, max_tokens=64, frequency_penalty=0.5,
        presence_penalty=-0.5, stop=["\n\n", "END"], stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "object"}}},
        tools=[{"type": "function", "function": {"name": "look", "parameters": {}}}],
        tool_choice="auto", seed=7, user="u-1", logit_bias={"50256": -100},
        x_vendor_extension={"keep": ["me"]},
    )
    expected = copy.deepcopy(body)
    assert chat_request(body) == expected


@pytest.mark.parametrize("fields", [
    {"stop": "END"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"response_format": {"type": "json_object"}}, {"stream": False},
    {"messages": [{"role": "user", "content": None}]},
], ids=["stop-string", "tool-choice-object", "json-object", "stream-false", "content-null"])
def test_valid_alternative_forms_are_accepted(fields):
    body = chat(**fields)
    assert chat_request(copy.deepcopy(body)) == body


# -- embeddings_request -------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ({"input": "hello"}, (["hello"], "float")),
    ({"input": ["a", "b"]}, (["a", "b"], "float")),
    ({"input": ["a"], "encoding_format": "base64"}, (["a"], "base64")),
    ({"input": ["a"], "encoding_format": "float"}, (["a"], "float")),
])
def test_valid_embeddings_request(body, expected):
    assert embeddings_request(body) == expected


@pytest.mark.parametrize("body, param", [
    ({}, "input"), ({"input": []}, "input"), ({"input": 5}, "input"),
    ({"input": ["a", 5]}, "input"), ({"input": {"text": "a"}}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embeddings_request_is_rejected(body, param):
    assert rejected(body, embeddings_request).param == param


# -- parse_json_body ----------------------------------------------------------------------

def parse(data, content_type="application/json"):
    app = flask.Flask(__name__)
    with app.test_request_context("/", method="POST", data=data, content_type=content_type):
        return parse_json_body(flask.request)


def parse_error(data, content_type="application/json"):
    with pytest.raises(errors.GatewayError) as caught:
        parse(data, content_type)
    assert 400 <= caught.value.status < 500
    assert caught.value.body()["error"]["message"]
    return caught.value


@pytest.mark.parametrize("content_type", ["application/json",
                                          "application/json; charset=utf-8",
                                          "application/vnd.api+json"])
def test_json_object_body_is_parsed(content_type):
    assert parse(b'{"model": "m", "n": [1, 2.5]}', content_type) == {"model": "m",
                                                                     "n": [1, 2.5]}


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": }', b"{'a': 1}", b'{"a": 1} x'],
                         ids=["empty", "unclosed", "no-value", "single-quotes", "trailing"])
def test_malformed_json_is_rejected(data):
    assert parse_error(data).kind == "invalid_request"


@pytest.mark.parametrize("data", [b'{"a": "\xff"}', b'{"a": "caf\xe9"}', b"\xc3\x28"],
                         ids=["ff-byte", "latin1", "bad-continuation"])
def test_invalid_utf8_is_rejected(data):
    assert parse_error(data).kind == "invalid_request"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constant_is_rejected(constant):
    parse_error(('{"temperature": %s}' % constant).encode())


@pytest.mark.parametrize("literal", ["1e400", "-1e400"])
def test_overflowing_number_is_rejected(literal):
    parse_error(('{"x_extra": %s}' % literal).encode())


@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a":', "}")],
                         ids=["arrays", "objects"])
def test_deeply_nested_json_is_rejected(opening, closing):
    data = (opening * 5000 + "1" + closing * 5000).encode()
    if opening == "[":
        data = b'{"a": ' + data + b"}"
    assert parse_error(data).kind == "invalid_request"


@pytest.mark.parametrize("data", [b"[]", b'[{"model": "m"}]', b'"text"', b"5", b"null"],
                         ids=["empty-array", "array", "string", "number", "null"])
def test_non_object_json_is_rejected(data):
    assert parse_error(data).kind == "invalid_request"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", ""])
def test_wrong_content_type_is_rejected(content_type):
    assert parse_error(b'{"model": "m"}', content_type).status == 415


# -- fields no provider can translate: refused here, naming the field -----------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def with_call(call):
    return [dict(USER), {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]


@pytest.mark.parametrize("call", [
    {"function": "x"}, "call_1", None, 5,
    {"type": "function"},
    {"type": "retrieval", "function": {"name": "f", "arguments": "{}"}},
    {"id": 5, "type": "function", "function": {"name": "f", "arguments": "{}"}},
    {"id": "c", "type": "function", "function": {"arguments": "{}"}},
    {"id": "c", "type": "function", "function": {"name": ["f"], "arguments": "{}"}},
    {"id": "c", "type": "function", "function": {"name": "f"}},
    {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
    {"id": "c", "type": "function", "function": {"name": "f", "arguments": None}},
], ids=["function-string", "string", "null", "number", "no-function", "wrong-type", "id-number",
        "no-name", "name-list", "no-arguments", "arguments-object", "arguments-null"])
def test_misshapen_assistant_tool_call_is_rejected(call):
    error = rejected(chat(messages=with_call(call)))
    assert error.param == "messages[1].tool_calls[0]"


def test_tool_call_without_type_or_id_is_accepted():
    call = {"function": {"name": "f", "arguments": "{}"}}
    body = chat(messages=with_call(call))
    assert chat_request(copy.deepcopy(body)) == body


@pytest.mark.parametrize("calls", [{"id": "c"}, "c", 5])
def test_tool_calls_not_a_list_is_rejected(calls):
    body = chat(messages=[dict(USER), {"role": "assistant", "tool_calls": calls}])
    assert rejected(body).param == "messages[1].tool_calls"


@pytest.mark.parametrize("field, value", [
    ("tool_call_id", ["call_1"]), ("tool_call_id", 1), ("tool_call_id", {"id": "c"}),
    ("name", 5), ("name", ["f"]),
])
def test_non_string_tool_call_id_or_name_is_rejected(field, value):
    messages = with_call(CALL)
    messages[2][field] = value
    assert rejected(chat(messages=messages)).param == f"messages[2].{field}"


@pytest.mark.parametrize("parameters", ["x", [1], 5, True])
def test_tool_parameters_not_an_object_are_rejected(parameters):
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    assert rejected(chat(tools=tools)).param == "tools[0].function.parameters"


def test_tool_description_not_a_string_is_rejected():
    tools = [TOOLS[0], {"type": "function", "function": {"name": "g", "description": 5}}]
    assert rejected(chat(tools=tools)).param == "tools[1].function.description"


@pytest.mark.parametrize("schema", ["s", [1], 5, True])
def test_json_schema_schema_not_an_object_is_rejected(schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert rejected(chat(response_format=fmt)).param == "response_format.json_schema.schema"


@pytest.mark.parametrize("choice", ["sometimes", "", {"type": "function", "function": "f"},
                                    {"type": "function"}, {"function": {"name": 5}},
                                    {"type": "web", "function": {"name": "f"}}])
def test_bad_tool_choice_is_rejected(choice):
    assert rejected(chat(tools=TOOLS, tool_choice=choice)).param == "tool_choice"


@pytest.mark.parametrize("choice", ["none", "auto", "required",
                                    {"type": "function", "function": {"name": "look"}}])
def test_every_openai_tool_choice_is_accepted(choice):
    assert chat_request(chat(tools=TOOLS, tool_choice=choice))["tool_choice"] == choice


@pytest.mark.parametrize("seed", ["7", 1.5, True])
def test_non_integer_seed_is_rejected(seed):
    assert rejected(chat(seed=seed)).param == "seed"


def test_more_than_2048_embedding_inputs_are_rejected():
    error = rejected({"input": ["x"] * 2049}, embeddings_request)
    assert error.param == "input" and "2048" in error.message


def test_2048_embedding_inputs_are_accepted():
    assert len(embeddings_request({"input": ["x"] * 2048})[0]) == 2048


# -- read_body: the size limit holds for chunked bodies too --------------------------------

class ServerStream:
    """gunicorn's input stream for a chunked body: ``read`` only, its end is the body's end."""

    def __init__(self, data, fail=None):
        self.data = io.BytesIO(data)
        self.fail = fail

    def read(self, size=-1):
        if self.fail is not None:
            raise self.fail
        return self.data.read(size)


def read_chunked(data, limit, fail=None):
    """Return ``read_body`` for a body with no Content-Length, as gunicorn hands it over."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit
    environ = {"wsgi.input": ServerStream(data, fail), "wsgi.input_terminated": True,
               "HTTP_TRANSFER_ENCODING": "chunked"}
    with app.test_request_context("/", method="POST", environ_overrides=environ):
        flask.request.environ.pop("CONTENT_LENGTH", None)
        return read_body(flask.request)


@pytest.mark.parametrize("size", [0, 1, 99, 100])
def test_chunked_body_up_to_the_limit_is_read_whole(size):
    assert read_chunked(b"a" * size, 100) == b"a" * size


@pytest.mark.parametrize("size", [101, 102, 5000])
def test_chunked_body_past_the_limit_is_413(size):
    with pytest.raises(errors.PayloadTooLarge) as caught:
        read_chunked(b"a" * size, 100)
    assert caught.value.status == 413 and "100" in caught.value.message


def test_broken_chunked_framing_is_400():
    from gunicorn.http.errors import InvalidChunkSize

    with pytest.raises(errors.InvalidRequest) as caught:
        read_chunked(b"", 100, fail=InvalidChunkSize(b"zz"))
    assert caught.value.status == 400


def test_chunked_body_cut_off_at_the_limit_is_400():
    class EndsEarly(ServerStream):
        def read(self, size=-1):
            data = super().read(size)
            if not data:
                raise ConnectionResetError("peer went away")
            return data

    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 10
    environ = {"wsgi.input": EndsEarly(b"a" * 10), "wsgi.input_terminated": True}
    with app.test_request_context("/", method="POST", environ_overrides=environ):
        flask.request.environ.pop("CONTENT_LENGTH", None)
        with pytest.raises(errors.InvalidRequest) as caught:
            read_body(flask.request)
    assert caught.value.status == 400
