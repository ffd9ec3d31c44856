"""The OpenAI shapes every provider translates from and into.

Reading a caller's request: the few places where a translation needs a
shape the request validation does not pin down raise ``InvalidRequest``
naming the field, so a request we cannot translate is the caller's 400,
decided before anything goes upstream.
"""

import time
import uuid

from app import errors


def new_id(prefix="chatcmpl-"):
    """Return a fresh response id."""
    return prefix + uuid.uuid4().hex[:24]


def usage(prompt_tokens, completion_tokens):
    """Return an OpenAI ``usage`` object."""
    prompt_tokens = int(prompt_tokens or 0)
    completion_tokens = int(completion_tokens or 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model, message, finish_reason, usage_obj=None, response_id=None):
    """Return a ``chat.completion`` with one choice."""
    body = {
        "id": response_id or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                     "logprobs": None}],
    }
    if usage_obj is not None:
        body["usage"] = usage_obj
    return body


def chunk(response_id, created, model, delta, finish_reason=None):
    """Return a ``chat.completion.chunk`` with one choice."""
    return {"id": response_id, "object": "chat.completion.chunk", "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}]}


def usage_chunk(response_id, created, model, usage_obj):
    """Return the final chunk that carries only usage (``stream_options.include_usage``)."""
    return {"id": response_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage_obj}


def tool_call(call_id, name, arguments_json):
    """Return one OpenAI tool call."""
    return {"id": call_id or new_id("call_"), "type": "function",
            "function": {"name": name, "arguments": arguments_json}}


class ChunkStream:
    """What every stream translation keeps: one id, the role said once, tool call indexes."""

    def __init__(self, label):
        self.label = label
        self.id = new_id()
        self.created = int(time.time())
        self.sent_role = False
        self.has_text = False
        self.tool_index = 0

    def chunk(self, delta, finish=None):
        return chunk(self.id, self.created, self.label, delta, finish)

    def usage_chunk(self, usage_obj):
        return usage_chunk(self.id, self.created, self.label, usage_obj)

    def delta(self, text, calls):
        """Return the delta for some text and tool calls; empty when there is neither."""
        delta = {}
        if text:
            delta["content"] = text
            self.has_text = True
        if calls:
            delta["tool_calls"] = [dict(call, index=self.tool_index + i)
                                   for i, call in enumerate(calls)]
            self.tool_index += len(calls)
        if delta and not self.sent_role:
            delta = {"role": "assistant", **delta}
            self.sent_role = True
        return delta


def has_content(chunk_obj):
    """Tell whether a chunk carries text, a tool call or a finish reason.

    Role-only and metadata frames do not count: the walk commits to a
    provider only once it has produced something a caller would see.
    """
    for choice in chunk_obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
        if delta.get("refusal") or delta.get("reasoning") or delta.get("reasoning_content"):
            return True
    return False


def tool_call_function(call, where):
    """Return ``(name, arguments)`` of a caller's tool call, or raise naming the field."""
    function = call.get("function")
    if function is None:
        return "", None
    if not isinstance(function, dict):
        raise errors.InvalidRequest(f"'{where}.function' must be an object", param=where)
    name, arguments = function.get("name", ""), function.get("arguments")
    if not isinstance(name, str):
        raise errors.InvalidRequest(f"'{where}.function.name' must be a string", param=where)
    if arguments is not None and not isinstance(arguments, (str, dict)):
        raise errors.InvalidRequest(f"'{where}.function.arguments' must be a JSON string",
                                    param=where)
    return name, arguments


def json_schema_of(body):
    """Return the schema of a ``json_schema`` response format (None if there is none)."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise errors.InvalidRequest("'response_format.json_schema' must be an object",
                                    param="response_format")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise errors.InvalidRequest("'response_format.json_schema.schema' must be an object",
                                    param="response_format")
    return schema
