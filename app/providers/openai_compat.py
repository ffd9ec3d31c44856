"""OpenAI-compatible upstreams (OpenRouter, Groq, Together, OpenAI).

The wire format is ours already: the request passes through (unknown
fields included) with the upstream's model name, and every answer's
``model`` is rewritten to ``provider/model``.
"""

from app import errors, shapes
from app.providers.base import Provider
from app.streaming import check_event, split_lines, sse_data


def upstream_body(body, model, stream):
    """Return the upstream request: the caller's body with the upstream model name."""
    out = dict(body)
    out["model"] = model
    if out.get("tools") == []:
        # OpenAI rejects an empty tools array; no tools is what the caller means.
        out.pop("tools")
    if stream:
        out["stream"] = True
        # Ask for usage so tokens can be counted; the caller's own
        # stream_options decide whether it is passed on.
        out["stream_options"] = {"include_usage": True}
    else:
        out.pop("stream", None)
        out.pop("stream_options", None)
    return out


def translate_completion(answer, label):
    """Return the upstream's chat.completion with ``model`` rewritten, or raise."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        if isinstance(answer, dict) and answer.get("error"):
            raise errors.UpstreamError(f"{label}: {answer['error']}",
                                       reason="upstream-error")
        raise errors.UpstreamError(f"{label}: answer has no choices",
                                   reason="malformed-response")
    if not answer["choices"]:
        raise errors.UpstreamError(f"{label}: empty answer", reason="empty-answer")
    answer["model"] = label
    answer.setdefault("object", "chat.completion")
    answer.setdefault("id", shapes.new_id())
    return answer


def translate_chunk(event, label):
    """Return one stream chunk with ``model`` rewritten; an in-stream error raises."""
    check_event(event, label)
    event["model"] = label
    event.setdefault("object", "chat.completion.chunk")
    return event


class OpenAICompatProvider(Provider):
    """A provider that speaks the OpenAI Chat Completions API."""

    def chat(self, body, model, call=None):
        request = upstream_body(body, model, False)
        label = f"{self.name}/{model}"
        with self.edge(label):
            answer = self.send_json("POST", "/chat/completions", request, call=call,
                                    model=model)
            return translate_completion(answer, label)

    def stream_chat(self, body, model, call=None):
        return self._chunks(upstream_body(body, model, True), model, call)

    def _chunks(self, request, model, call):
        label = f"{self.name}/{model}"
        with self.edge(label):
            stream = self.open_stream("/chat/completions", request, call=call, model=model)
            try:
                finished = False
                for event in sse_data(split_lines(stream.chunks(), label), label):
                    chunk = translate_chunk(event, label)
                    finished = finished or any(c.get("finish_reason")
                                               for c in chunk.get("choices") or ())
                    yield chunk
                if not finished:
                    raise errors.UpstreamError(f"{label}: stream ended without a finish",
                                               reason="closed-early")
                stream.finished = True
            finally:
                stream.close()

    def embed_one_batch(self, inputs, model, body, call):
        request = {"model": model, "input": inputs, "encoding_format": "float"}
        if body.get("dimensions") is not None:
            request["dimensions"] = body["dimensions"]
        label = f"{self.name}/{model}"
        with self.edge(label):
            answer = self.send_json("POST", "/embeddings", request, call=call, model=model)
            data = sorted(answer["data"], key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in d["embedding"]] for d in data]
            if len(vectors) != len(inputs):
                raise errors.UpstreamError(f"{label}: wrong number of embeddings",
                                           reason="malformed-response")
            return vectors, (answer.get("usage") or {}).get("prompt_tokens", 0)

    def list_models(self, timeout=None):
        with self.edge(self.name):
            answer = self.send_json("GET", "/models", timeout=timeout)
            return [str(m["id"]) for m in answer["data"]]

    def probe(self, timeout):
        self.probe_path("/models", timeout)
