"""Parse and validate request bodies before any upstream call (SPEC §3).

Every rejection is an ``InvalidRequest`` naming the offending field, so
bad input is always a 400 in the error envelope, never a 500.
"""

import json
import math

from werkzeug.exceptions import RequestEntityTooLarge

from app import errors

try:  # what gunicorn raises for a broken chunked body (a bad chunk size line, ...)
    from gunicorn.http.errors import ParseException as _BadFraming
except ImportError:  # served by another WSGI server
    _BadFraming = ()

ROLES = ("system", "user", "assistant", "tool")
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "frequency_penalty": (-2, 2),
           "presence_penalty": (-2, 2)}
_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("none", "auto", "required")
# OpenAI's own limit on inputs per embeddings call; past it, one request
# would fan out into dozens of sequential upstream calls.
MAX_EMBEDDING_INPUTS = 2048
_JSON_TYPES = ("application/json",)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def read_body(request):
    """Return the whole body: 413 past MAX_CONTENT_LENGTH even when chunked, 400 if garbled.

    With a Content-Length Werkzeug refuses an oversize body up front. A
    chunked body has none, and Werkzeug's stream then stops at the limit
    and returns what it read as if that were all, so one byte more is
    asked of the server's own stream to tell the two apart.
    """
    limit = request.max_content_length
    too_large = errors.PayloadTooLarge(f"request body is larger than {limit} bytes")
    try:
        data = request.stream.read()
        if limit is not None and len(data) >= limit and request.content_length is None \
                and request.environ["wsgi.input"].read(1):
            raise too_large
    except RequestEntityTooLarge:
        raise too_large from None
    except _BadFraming as exc:
        raise errors.InvalidRequest("request body has a broken chunked encoding "
                                    f"({type(exc).__name__})") from None
    except OSError:  # the client went away in the middle of the body
        raise errors.InvalidRequest("request body ended before it was complete") from None
    return data


def parse_json_body(request):
    """Return the request's JSON object, or raise a 4xx GatewayError."""
    mimetype = request.mimetype or ""
    if mimetype not in _JSON_TYPES and not mimetype.endswith("+json"):
        raise errors.UnsupportedMediaType(
            f"Content-Type must be application/json, got {mimetype or 'none'!r}")
    raw = read_body(request)
    try:
        doc = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise errors.InvalidRequest("JSON body is nested too deeply") from None
    except UnicodeDecodeError:
        raise errors.InvalidRequest("request body is not valid UTF-8") from None
    except ValueError as exc:
        raise errors.InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.InvalidRequest("request body must be a JSON object")
    return doc


def _number(body, name, low=None, high=None, *, integer=False):
    value = body.get(name)
    if value is None:
        return
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise errors.InvalidRequest(f"'{name}' must be {kind}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise errors.InvalidRequest(f"'{name}' must be between {low} and {high}",
                                    param=name)


def _content(content, index):
    where = f"messages[{index}].content"
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise errors.InvalidRequest(f"{where} must be a string, null or a list of parts",
                                    param=where)
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        image = part.get("image_url") if kind == "image_url" else None
        if isinstance(image, dict) and isinstance(image.get("url"), str):
            continue
        if isinstance(image, str):  # some clients send the URL bare
            part["image_url"] = {"url": image}
            continue
        raise errors.InvalidRequest(
            f"{where}: each part must be {{'type':'text','text'}} or "
            "{'type':'image_url','image_url':{'url'}}", param=where)


def _is_object(value):
    return isinstance(value, dict)


def _is_tool_call(call):
    """Tell whether ``call`` is ``{id?: str, type?: function, function: {name, arguments}}``."""
    if not _is_object(call) or not _is_object(call.get("function")):
        return False
    function = call["function"]
    # ``type`` may be left out (Ollama's clients do); when present it must be right.
    return call.get("type", "function") == "function" and isinstance(call.get("id", ""), str) \
        and isinstance(function.get("name"), str) and isinstance(function.get("arguments"), str)


def _tool_call(call, where):
    if not _is_tool_call(call):
        raise errors.InvalidRequest(
            f"{where} must be {{'id': str, 'type': 'function', 'function': "
            "{'name': str, 'arguments': str (JSON)}}", param=where)


def _message(message, index):
    where = f"messages[{index}]"
    if not _is_object(message):
        raise errors.InvalidRequest(f"{where} must be an object", param="messages")
    if message.get("role") == "developer":
        message["role"] = "system"  # OpenAI's newer name for the same thing
    if message.get("role") not in ROLES:
        raise errors.InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}",
                                    param="messages")
    _content(message.get("content"), index)
    for name in ("tool_call_id", "name"):
        if message.get(name) is not None and not isinstance(message[name], str):
            raise errors.InvalidRequest(f"{where}.{name} must be a string",
                                        param=f"{where}.{name}")
    calls = message.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise errors.InvalidRequest(f"{where}.tool_calls must be a list",
                                    param=f"{where}.tool_calls")
    for number, call in enumerate(calls):
        _tool_call(call, f"{where}.tool_calls[{number}]")


def _messages(messages):
    if not isinstance(messages, list) or not messages:
        raise errors.InvalidRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        _message(message, index)


def _tool_choice(choice):
    if choice is None or choice in TOOL_CHOICES:
        return
    function = choice.get("function") if _is_object(choice) else None
    if not _is_object(function) or choice.get("type", "function") != "function" \
            or not isinstance(function.get("name"), str):
        raise errors.InvalidRequest(
            f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or "
            "{'type': 'function', 'function': {'name': str}}", param="tool_choice")


def _tool(tool, index):
    function = tool.get("function") if _is_object(tool) else None
    if not _is_object(tool) or tool.get("type") != "function" or \
            not _is_object(function) or not isinstance(function.get("name"), str):
        raise errors.InvalidRequest(
            "each tool must be {'type': 'function', 'function': {'name', ...}}",
            param="tools")
    where = f"tools[{index}].function"
    if function.get("parameters") is not None and not _is_object(function["parameters"]):
        raise errors.InvalidRequest(f"{where}.parameters must be a JSON schema object",
                                    param=f"{where}.parameters")
    if function.get("description") is not None and \
            not isinstance(function["description"], str):
        raise errors.InvalidRequest(f"{where}.description must be a string",
                                    param=f"{where}.description")


def _tools(body):
    _tool_choice(body.get("tool_choice"))
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise errors.InvalidRequest("'tools' must be a list", param="tools")
    for index, tool in enumerate(tools):
        _tool(tool, index)


def _json_schema(json_schema):
    if not _is_object(json_schema):
        raise errors.InvalidRequest("'response_format.json_schema' must be an object",
                                    param="response_format")
    if json_schema.get("schema") is not None and not _is_object(json_schema["schema"]):
        raise errors.InvalidRequest(
            "'response_format.json_schema.schema' must be a JSON schema object",
            param="response_format.json_schema.schema")


def _response_format(body):
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
        raise errors.InvalidRequest("'response_format.type' must be one of "
                                    + ", ".join(_FORMATS), param="response_format")
    if fmt["type"] == "json_schema":
        _json_schema(fmt.get("json_schema"))
    if fmt["type"] == "text":
        body.pop("response_format")


def chat_request(body):
    """Validate a chat completion request in place and return it."""
    _messages(body.get("messages"))
    for name, (low, high) in _RANGES.items():
        _number(body, name, low, high)
    _number(body, "max_tokens", 1, integer=True)
    _number(body, "max_completion_tokens", 1, integer=True)
    _number(body, "n", 1, 1, integer=True)
    _number(body, "seed", integer=True)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise errors.InvalidRequest("'stop' must be a string or a list of strings",
                                    param="stop")
    _tools(body)
    _response_format(body)
    if not isinstance(body.get("stream", False), bool):
        raise errors.InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.InvalidRequest("'stream_options' must be an object",
                                    param="stream_options")
    if options and not isinstance(options.get("include_usage", False), bool):
        raise errors.InvalidRequest("'stream_options.include_usage' must be a boolean",
                                    param="stream_options")
    return body


def embeddings_request(body):
    """Validate an embeddings request; return ``(inputs, encoding_format)``."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(i, str) for i in inputs):
        raise errors.InvalidRequest("'input' must be a string or a non-empty list of strings",
                                    param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise errors.InvalidRequest(f"'input' has {len(inputs)} items; at most "
                                    f"{MAX_EMBEDDING_INPUTS} per request", param="input")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if not isinstance(encoding, str) or encoding not in ("float", "base64"):
        raise errors.InvalidRequest("'encoding_format' must be 'float' or 'base64'",
                                    param="encoding_format")
    return inputs, encoding
