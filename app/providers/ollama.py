"""Ollama's native API: ``/api/chat``, ``/api/embed``, ``/api/tags``.

Pure functions translate our (OpenAI-shaped) request into Ollama's body
and its answers and NDJSON stream lines back; ``OllamaProvider`` only
sends them.
"""

import json
import re

from app import errors, shapes
from app.providers.base import Provider
from app.streaming import check_event, loads_upstream, split_lines

# Model families Ollama can run tool calls with (SPEC §4).
TOOL_FAMILIES = ("llama3.1", "llama3.2", "llama3.3", "qwen2.5", "qwen3", "mistral",
                 "mixtral", "command-r", "firefunction")
# max_completion_tokens (OpenAI's newer name) first, so max_tokens wins when both are sent.
_OPTION_FIELDS = {"max_completion_tokens": "num_predict",
                  "temperature": "temperature", "top_p": "top_p", "max_tokens": "num_predict",
                  "stop": "stop", "seed": "seed", "frequency_penalty": "frequency_penalty",
                  "presence_penalty": "presence_penalty"}
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def supports_tools(model):
    """Tell whether an Ollama model is known to support tool calls."""
    family = model.rsplit("/", 1)[-1].split(":", 1)[0].lower()
    return family.startswith(TOOL_FAMILIES)


def _message_parts(content):
    """Return ``(text, images)`` of an OpenAI message content."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for part in content:
        if part["type"] == "text":
            texts.append(part["text"])
            continue
        url = part["image_url"]["url"]
        if not url.startswith("data:"):
            # The gateway never fetches URLs on a caller's behalf (no SSRF).
            raise errors.CapabilityError(
                "ollama accepts images only as data: URLs; http(s) image URLs are "
                "not fetched by the gateway", param="messages")
        header, _, data = url.partition(",")
        if ";base64" not in header or not data:
            raise errors.InvalidRequest("image data: URL must be base64-encoded",
                                        param="messages")
        images.append(data)
    return "\n".join(texts), images


def _tool_calls_to_ollama(tool_calls, where):
    out = []
    for index, call in enumerate(tool_calls):
        name, arguments = shapes.tool_call_function(call, f"{where}[{index}]")
        arguments = arguments or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
                raise errors.InvalidRequest("tool call arguments must be a JSON string",
                                            param="messages") from None
        out.append({"function": {"name": name, "arguments": arguments}})
    return out


def chat_body(body, model, stream):
    """Return Ollama's ``/api/chat`` body for our request."""
    messages = []
    for index, message in enumerate(body["messages"]):
        text, images = _message_parts(message.get("content"))
        out = {"role": message["role"], "content": text}
        if images:
            out["images"] = images
        if message.get("tool_calls"):
            out["tool_calls"] = _tool_calls_to_ollama(message["tool_calls"],
                                                      f"messages[{index}].tool_calls")
        if message["role"] == "tool" and message.get("name"):
            out["tool_name"] = message["name"]
        messages.append(out)
    request = {"model": model, "messages": messages, "stream": stream}
    options = {target: body[source] for source, target in _OPTION_FIELDS.items()
               if body.get(source) is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]  # Ollama takes only a list
    if options:
        request["options"] = options
    kind = (body.get("response_format") or {}).get("type")
    if kind == "json_object":
        request["format"] = "json"
    elif kind == "json_schema":
        request["format"] = shapes.json_schema_of(body) or {}
    if body.get("tools"):
        request["tools"] = body["tools"]
    return request


def strip_fences(text):
    """Return ``text`` without a wrapping ```json fence (models add them to JSON)."""
    match = _FENCE.match(text or "")
    return match.group(1).strip() if match else text


def _tool_calls_from_ollama(calls):
    out = []
    for call in calls or ():
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append(shapes.tool_call(call.get("id"), function.get("name", ""), arguments))
    return out


def _finish_reason(answer, tool_calls):
    if tool_calls:
        return "tool_calls"
    return "length" if answer.get("done_reason") == "length" else "stop"


def _usage(answer):
    return shapes.usage(answer.get("prompt_eval_count"), answer.get("eval_count"))


def translate_answer(answer, label, wants_json):
    """Return a ``chat.completion`` for Ollama's non-streamed answer."""
    message = answer.get("message") if isinstance(answer, dict) else None
    if not isinstance(message, dict):
        raise errors.UpstreamError(f"{label}: answer has no message",
                                   reason="malformed-response")
    content = message.get("content") or ""
    if wants_json:
        content = strip_fences(content)
    tool_calls = _tool_calls_from_ollama(message.get("tool_calls"))
    out = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if tool_calls:
        out["tool_calls"] = tool_calls
    return shapes.completion(label, out, _finish_reason(answer, tool_calls), _usage(answer))


class StreamTranslator(shapes.ChunkStream):
    """Turn Ollama's NDJSON stream lines into OpenAI chunks, keeping the stream's state."""

    done = False

    def translate(self, line):
        """Return the chunks for one NDJSON line (possibly none)."""
        try:
            event = loads_upstream(line)
        except ValueError:
            raise errors.UpstreamError(f"{self.label}: malformed stream line",
                                       reason="malformed-response") from None
        check_event(event, self.label)
        message = event.get("message") or {}
        delta = self.delta(message.get("content"),
                           _tool_calls_from_ollama(message.get("tool_calls")))
        out = [self.chunk(delta)] if delta else []
        if event.get("done"):
            self.done = True
            reason = "tool_calls" if self.tool_index else _finish_reason(event, ())
            out += [self.chunk({}, reason), self.usage_chunk(_usage(event))]
        return out


class OllamaProvider(Provider):
    """The local Ollama server."""

    def check_capabilities(self, body, model):
        if body.get("tools") and not supports_tools(model):
            raise errors.CapabilityError(
                f"ollama/{model} does not support tools; use a tool-capable model "
                f"({', '.join(TOOL_FAMILIES)}) or an alias such as mana/structured",
                param="tools")

    def chat(self, body, model, call=None):
        self.check_capabilities(body, model)
        request = chat_body(body, model, False)
        label = f"{self.name}/{model}"
        with self.edge(label):
            answer = self.send_json("POST", "/api/chat", request, call=call, model=model)
            return translate_answer(answer, label, bool(body.get("response_format")))

    def stream_chat(self, body, model, call=None):
        self.check_capabilities(body, model)
        return self._chunks(chat_body(body, model, True), model, call)

    def _chunks(self, request, model, call):
        label = f"{self.name}/{model}"
        translator = StreamTranslator(label)
        with self.edge(label):
            stream = self.open_stream("/api/chat", request, call=call, model=model)
            try:
                for line in split_lines(stream.chunks(), label):
                    if line.strip():
                        yield from translator.translate(line)
                    if translator.done:
                        stream.finished = True
                        return
                raise errors.UpstreamError(f"{label}: stream ended before done",
                                           reason="closed-early")
            finally:
                stream.close()

    def embed_one_batch(self, inputs, model, body, call):
        label = f"{self.name}/{model}"
        with self.edge(label):
            answer = self.send_json("POST", "/api/embed", {"model": model, "input": inputs},
                                    call=call, model=model)
            vectors = [[float(x) for x in v] for v in answer["embeddings"]]
            if len(vectors) != len(inputs):
                raise errors.UpstreamError(f"{label}: wrong number of embeddings",
                                           reason="malformed-response")
            return vectors, answer.get("prompt_eval_count", 0)

    def list_models(self, timeout=None):
        with self.edge(self.name):
            answer = self.send_json("GET", "/api/tags", timeout=timeout)
            return [str(m["name"]) for m in answer["models"]]

    def probe(self, timeout):
        self.probe_path("/api/tags", timeout)
