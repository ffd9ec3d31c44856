"""Google Gemini's REST API (v1beta): ``generateContent``,
``streamGenerateContent?alt=sse``, ``batchEmbedContents``, ``models``.

Pure functions translate our (OpenAI-shaped) request into Gemini's body
and its answers and SSE events back; ``GeminiProvider`` only sends them.
No vendor SDK: the wire format is small and the SDK would bring its own
transport, timeouts and errors. The API key travels in the
``x-goog-api-key`` header (set by ``build_providers``), never in a URL.
"""

import json
import re
from urllib.parse import quote

from app import errors, shapes
from app.providers.base import Provider
from app.streaming import check_event, split_lines, sse_data

# Finish and block reasons that mean Gemini refused on policy grounds (SPEC §4):
# retrying elsewhere is the caller's decision, not the gateway's.
SAFETY_REASONS = ("SAFETY", "RECITATION", "PROHIBITED_CONTENT", "SPII", "BLOCKLIST",
                  "IMAGE_SAFETY")
# Gemini 3 rejects a replayed functionCall without a thought signature; Google
# documents this value for histories it did not generate (e.g. after a fallback).
SKIP_SIGNATURE = "skip_thought_signature_validator"
# Penalties are left out on purpose: several Gemini models answer 400 to them,
# and a 400 stops the chain walk for a field most callers send by default.
_CONFIG_FIELDS = {"max_completion_tokens": "maxOutputTokens",
                  "temperature": "temperature", "top_p": "topP",
                  "max_tokens": "maxOutputTokens", "seed": "seed"}
# The keywords of Gemini's OpenAPI-subset Schema; anything else is a 400 upstream.
_SCHEMA_KEYS = frozenset((
    "type", "format", "title", "description", "nullable", "enum", "items", "properties",
    "required", "anyOf", "minItems", "maxItems", "minProperties", "maxProperties",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "default", "example",
    "propertyOrdering"))
_TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"')
_MAX_MODEL_PAGES = 20   # a runaway nextPageToken must not loop forever


def model_path(model, method):
    """Return the path of ``method`` on ``model``, the name quoted to stay one segment."""
    name = model.removeprefix("models/")
    return f"/models/{quote(name, safe='')}:{method}"


# ---- request ---------------------------------------------------------------


def clean_schema(schema):
    """Return a copy of ``schema`` with only the keywords Gemini's Schema accepts."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: clean_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = clean_schema(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [clean_schema(sub) for sub in value]
        elif key == "type" and isinstance(value, list):
            out.update(_union_type(value))
        elif key in _SCHEMA_KEYS:
            out[key] = value
    return out


def _union_type(types):
    """Return Gemini's form of a JSON-schema type list such as ``["string", "null"]``."""
    concrete = [t for t in types if t != "null"]
    out = {"nullable": True} if len(concrete) < len(types) else {}
    if len(concrete) == 1:
        out["type"] = concrete[0]
    elif concrete:
        out["anyOf"] = [{"type": t} for t in concrete]
    return out


def _text_of(content):
    """Return the text of a message content (string or list of parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def _inline_data(url):
    """Return an ``inlineData`` part for a base64 ``data:`` URL."""
    if not url.startswith("data:"):
        # The gateway never fetches URLs on a caller's behalf (no SSRF).
        raise errors.CapabilityError(
            "google accepts images only as data: URLs; http(s) image URLs are not "
            "fetched by the gateway", param="messages")
    header, _, data = url.partition(",")
    mime_type = header[5:].split(";", 1)[0]
    if ";base64" not in header or not data or not mime_type:
        raise errors.InvalidRequest("image data: URL must be base64 with a media type",
                                    param="messages")
    return {"inlineData": {"mimeType": mime_type, "data": data}}


def _content_parts(content):
    """Return Gemini parts for a user or assistant message content."""
    if content is None or isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append({"text": part["text"]})
        else:
            parts.append(_inline_data(part["image_url"]["url"]))
    return parts


def _parse_arguments(arguments):
    """Return tool-call arguments (a JSON string) as an object."""
    if not isinstance(arguments, str):
        return arguments if isinstance(arguments, dict) else {}
    try:
        parsed = json.loads(arguments or "{}")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it parses
        raise errors.InvalidRequest("tool call arguments must be a JSON string",
                                    param="messages") from None
    if not isinstance(parsed, dict):
        raise errors.InvalidRequest("tool call arguments must be a JSON object",
                                    param="messages")
    return parsed


def _signature(call):
    """Return the thought signature a replayed tool call carries, if any."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) else None


def _function_call_parts(tool_calls, where):
    """Return ``functionCall`` parts for an assistant message's tool calls."""
    parts = []
    for index, call in enumerate(tool_calls):
        name, arguments = shapes.tool_call_function(call, f"{where}[{index}]")
        part = {"functionCall": {"name": name, "args": _parse_arguments(arguments)}}
        signature = _signature(call)
        # Gemini wants the signature on the first call of a step only.
        if signature or index == 0:
            part["thoughtSignature"] = signature or SKIP_SIGNATURE
        parts.append(part)
    return parts


def _function_response_part(message, names, where):
    """Return the ``functionResponse`` part for a ``tool`` message."""
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise errors.InvalidRequest(f"'{where}.tool_call_id' must be a string", param=where)
    name = names.get(call_id) or message.get("name")
    if not name:
        raise errors.InvalidRequest(
            "a tool message's tool_call_id must match an earlier assistant tool call",
            param="messages")
    text = _text_of(message.get("content"))
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it parses
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _append(contents, role, parts):
    """Add parts to ``contents``, merging into the last turn: Gemini needs alternation."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def build_contents(messages):
    """Return ``(contents, system_texts)`` for OpenAI messages."""
    contents, system, names = [], [], {}
    for index, message in enumerate(messages):
        role, where = message["role"], f"messages[{index}]"
        if role == "system":
            system.append(_text_of(message.get("content")))
            continue
        if role == "tool":
            _append(contents, "user", [_function_response_part(message, names, where)])
            continue
        parts = _content_parts(message.get("content"))
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:
            call_parts = _function_call_parts(calls, f"{where}.tool_calls")
            names.update({c["id"]: p["functionCall"]["name"] for c, p in zip(calls, call_parts)
                          if isinstance(c.get("id"), str)})
            parts += call_parts
        _append(contents, "model" if role == "assistant" else "user", parts)
    return contents, [text for text in system if text]


def _generation_config(body):
    """Return ``generationConfig`` for sampling options and ``response_format``."""
    config = {target: body[source] for source, target in _CONFIG_FIELDS.items()
              if body.get(source) is not None}
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    schema = shapes.json_schema_of(body)
    if schema:
        config["responseSchema"] = clean_schema(schema)
    return config


def _function_declaration(tool, where):
    """Return Gemini's ``functionDeclaration`` for an OpenAI function tool."""
    function = tool["function"]
    out = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise errors.InvalidRequest(f"'{where}.function.parameters' must be an object",
                                    param=where)
    parameters = clean_schema(parameters)
    # Gemini rejects an OBJECT schema with no properties: a function without
    # arguments must leave ``parameters`` out.
    if parameters.get("properties") or parameters.get("type") not in (None, "object"):
        out["parameters"] = parameters
    return out


def tool_config(choice):
    """Return ``toolConfig`` for an OpenAI ``tool_choice`` (None when absent)."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
    name = ((choice.get("function") or {}).get("name")
            if isinstance(choice, dict) else None)
    if not isinstance(name, str) or not name:
        raise errors.InvalidRequest(
            "'tool_choice' must be auto, none, required or "
            "{'type': 'function', 'function': {'name'}}", param="tool_choice")
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}


def chat_body(body):
    """Return Gemini's ``generateContent`` body for our request."""
    contents, system = build_contents(body["messages"])
    request = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    if body.get("tools"):
        request["tools"] = [{"functionDeclarations": [
            _function_declaration(tool, f"tools[{index}]")
            for index, tool in enumerate(body["tools"])]}]
        choice = tool_config(body.get("tool_choice"))
        if choice:
            request["toolConfig"] = choice
    return request


# ---- answers ---------------------------------------------------------------


def _raise_if_prompt_blocked(answer, label):
    reason = (answer.get("promptFeedback") or {}).get("blockReason")
    if reason:
        raise errors.Blocked(f"{label} blocked the prompt ({reason})")


def _raise_if_blocked(finish_reason, label):
    if finish_reason in SAFETY_REASONS:
        raise errors.Blocked(f"{label} blocked the answer ({finish_reason})")


def _tool_call(part):
    """Return an OpenAI tool call for a ``functionCall`` part, its signature kept."""
    function = part["functionCall"]
    call = shapes.tool_call(None, str(function.get("name", "")),
                            json.dumps(function.get("args") or {}))
    if part.get("thoughtSignature"):
        # Google's own OpenAI-compatible endpoint carries it here; callers that
        # replay the assistant message hand it back to _function_call_parts.
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def candidate_output(candidate):
    """Return ``(text, tool_calls)`` of a candidate, thought summaries left out."""
    parts = (candidate.get("content") or {}).get("parts") or ()
    texts, calls = [], []
    for part in parts:
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        if isinstance(part.get("functionCall"), dict):
            calls.append(_tool_call(part))
    return "".join(texts), calls


def finish_reason(reason, has_text, has_calls, label):
    """Return the OpenAI finish reason, or raise for an answer with nothing in it."""
    if not has_text and not has_calls:
        if reason == "MAX_TOKENS":
            raise errors.Truncated(
                f"{label} hit its token limit (MAX_TOKENS) before producing any text")
        raise errors.UpstreamError(f"{label}: empty answer (finish reason {reason})",
                                   reason="empty-answer")
    if has_calls:
        return "tool_calls"
    return "length" if reason == "MAX_TOKENS" else "stop"


def usage(metadata):
    """Return OpenAI usage for ``usageMetadata``; thinking tokens count as completion."""
    metadata = metadata or {}
    completion = (metadata.get("candidatesTokenCount") or 0) + \
        (metadata.get("thoughtsTokenCount") or 0)
    return shapes.usage(metadata.get("promptTokenCount"), completion)


def _first_candidate(answer, label):
    candidates = answer.get("candidates")
    if not isinstance(candidates, list) or not candidates or \
            not isinstance(candidates[0], dict):
        raise errors.UpstreamError(f"{label}: answer has no candidates",
                                   reason="empty-answer")
    return candidates[0]


def translate_answer(answer, label):
    """Return a ``chat.completion`` for Gemini's ``generateContent`` answer, or raise."""
    if not isinstance(answer, dict):
        raise errors.UpstreamError(f"{label}: answer is not an object",
                                   reason="malformed-response")
    _raise_if_prompt_blocked(answer, label)
    candidate = _first_candidate(answer, label)
    reason = candidate.get("finishReason")
    _raise_if_blocked(reason, label)
    text, calls = candidate_output(candidate)
    finish = finish_reason(reason, bool(text), bool(calls), label)
    message = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return shapes.completion(label, message, finish, usage(answer.get("usageMetadata")))


class StreamTranslator(shapes.ChunkStream):
    """Turn Gemini's SSE events into OpenAI chunks, keeping the stream's state."""

    def __init__(self, label):
        super().__init__(label)
        self.finish = None
        self.usage = None

    def translate(self, event):
        """Return the chunks for one SSE event (possibly none)."""
        check_event(event, self.label)
        _raise_if_prompt_blocked(event, self.label)
        self.usage = event.get("usageMetadata") or self.usage
        candidates = event.get("candidates")
        if self.finish or not isinstance(candidates, list) or not candidates:
            return []
        candidate = candidates[0] if isinstance(candidates[0], dict) else {}
        reason = candidate.get("finishReason")
        _raise_if_blocked(reason, self.label)
        delta = self.delta(*candidate_output(candidate))
        out = [self.chunk(delta)] if delta else []
        if reason:
            self.finish = finish_reason(reason, self.has_text, self.tool_index > 0,
                                        self.label)
            out.append(self.chunk({}, self.finish))
        return out

    def end(self):
        """Return the closing usage chunk; raise if the stream never finished."""
        if self.finish is None:
            raise errors.UpstreamError(f"{self.label}: stream ended without a finish reason",
                                       reason="closed-early")
        if self.usage is None:
            return []
        return [self.usage_chunk(usage(self.usage))]


# ---- embeddings and models -------------------------------------------------


def embed_body(inputs, model, dimensions=None):
    """Return Gemini's ``batchEmbedContents`` body for a list of strings."""
    name = "models/" + model.removeprefix("models/")
    requests = []
    for text in inputs:
        request = {"model": name, "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return {"requests": requests}


def translate_embeddings(answer, count, label):
    """Return the vectors of a ``batchEmbedContents`` answer, or raise."""
    try:
        vectors = [[float(x) for x in e["values"]] for e in answer["embeddings"]]
    except (KeyError, TypeError, ValueError):
        raise errors.UpstreamError(f"{label}: malformed embeddings",
                                   reason="malformed-response") from None
    if len(vectors) != count:
        raise errors.UpstreamError(f"{label}: wrong number of embeddings",
                                   reason="malformed-response")
    return vectors


def model_names(answer):
    """Return the model names of one ``models`` page, without the ``models/`` prefix."""
    try:
        return [str(m["name"]).removeprefix("models/") for m in answer.get("models", ())]
    except (AttributeError, KeyError, TypeError):
        raise errors.UpstreamError("google: malformed model list",
                                   reason="malformed-response") from None


class GeminiProvider(Provider):
    """Google's Gemini API."""

    def chat(self, body, model, call=None):
        request = chat_body(body)
        label = f"{self.name}/{model}"
        with self.edge(label):
            answer = self.send_json("POST", model_path(model, "generateContent"), request,
                                    call=call, model=model)
            return translate_answer(answer, label)

    def stream_chat(self, body, model, call=None):
        return self._chunks(chat_body(body), model, call)

    def _chunks(self, request, model, call):
        label = f"{self.name}/{model}"
        translator = StreamTranslator(label)
        with self.edge(label):
            stream = self.open_stream(model_path(model, "streamGenerateContent"), request,
                                      call=call, model=model, params={"alt": "sse"})
            try:
                for event in sse_data(split_lines(stream.chunks(), label), label):
                    yield from translator.translate(event)
                yield from translator.end()
                stream.finished = True
            finally:
                stream.close()

    embed_batch = 100   # batchEmbedContents' limit per call

    def embed_one_batch(self, inputs, model, body, call):
        label = f"{self.name}/{model}"
        dimensions = (body or {}).get("dimensions")
        with self.edge(label):
            answer = self.send_json("POST", model_path(model, "batchEmbedContents"),
                                    embed_body(inputs, model, dimensions), call=call,
                                    model=model)
            # Gemini reports no token count for embeddings.
            return translate_embeddings(answer, len(inputs), label), 0

    def list_models(self, timeout=None):
        names, params = [], {"pageSize": 1000}
        with self.edge(self.name):
            for _ in range(_MAX_MODEL_PAGES):
                answer = self.send_json("GET", "/models", params=params, timeout=timeout)
                names.extend(model_names(answer))
                token = answer.get("nextPageToken")
                if not token:
                    break
                params = {"pageSize": 1000, "pageToken": token}
        return names

    def probe(self, timeout):
        self.probe_path("/models", timeout)

    # Gemini's own error conventions, on top of the common classification.

    def refuses_credentials(self, status, text):
        # A bad key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
        return super().refuses_credentials(status, text) or (
            status == 400 and "API_KEY_INVALID" in text)

    def retry_delay(self, text):
        # A 429 says how long to wait in its body: "retryDelay": "39s".
        match = _RETRY_DELAY.search(text)
        return float(match.group(1)) if match else None
