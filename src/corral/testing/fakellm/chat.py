"""OpenAI Chat Completions: ``POST /v1/chat/completions``, streamed or JSON.

Streamed replies end with a chunk whose ``choices`` is empty and which carries
``usage`` (what ``stream_options.include_usage`` asks for; sent always unless the
server is told otherwise, so a meter sees usage whatever the client asked),
then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from corral.testing.fakellm.actions import Reply

CHUNK = 24


def _usage(r: Reply) -> dict[str, Any]:
    return {"prompt_tokens": r.input_tokens, "completion_tokens": r.output_tokens,
            "total_tokens": r.input_tokens + r.output_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cache_read_tokens}}


def _finish(r: Reply) -> str:
    return "tool_calls" if r.calls else "stop"


def _tool_calls(r: Reply) -> list[dict[str, Any]]:
    return [{"id": f"call_{c.id}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments_json()}} for c in r.calls]


def completion(r: Reply, model: str, cid: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": r.text or None}
    if r.calls:
        msg["tool_calls"] = _tool_calls(r)
    return {"id": f"chatcmpl-{cid}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                         "finish_reason": _finish(r)}],
            "usage": _usage(r)}


def stream(r: Reply, model: str, cid: str, *, usage_chunk: bool = True) -> Iterator[bytes]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": f"chatcmpl-{cid}", "object": "chat.completion.chunk",
                "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}])
    for i in range(0, len(r.text), CHUNK):
        yield chunk([{"index": 0, "delta": {"content": r.text[i:i + CHUNK]},
                      "finish_reason": None}])
    for n, call in enumerate(_tool_calls(r)):
        yield chunk([{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": n, "id": call["id"], "type": "function",
             "function": {"name": call["function"]["name"], "arguments": ""}}]}}])
        args = call["function"]["arguments"]
        for i in range(0, len(args), CHUNK):
            yield chunk([{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": n, "function": {"arguments": args[i:i + CHUNK]}}]}}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": _finish(r)}])
    if usage_chunk:
        yield chunk([], usage=_usage(r))
    yield b"data: [DONE]\n\n"


def error(status: int, text: str, kind: str | None = None) -> dict[str, Any]:
    """The error body the API sends with ``status`` (``kind``: type and code)."""
    kind = kind or {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "server_error")
    return {"error": {"message": text, "type": kind, "param": None,
                      "code": kind if status in (402, 403, 429) else None}}
