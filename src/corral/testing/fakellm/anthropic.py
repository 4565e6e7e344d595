"""Anthropic Messages API: ``POST /v1/messages``, streamed (SSE) or JSON.

Usage follows the real API: ``message_start.message.usage`` carries the input
side (and ``output_tokens: 1``), ``message_delta.usage`` the final output count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from corral.testing.fakellm.actions import Reply

#: how many characters go into one text_delta / input_json_delta
CHUNK = 24

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def _id(prefix: str, raw: str) -> str:
    return f"{prefix}_01{raw[:22]}"


def _usage(r: Reply, output: int) -> dict[str, Any]:
    return {"input_tokens": r.input_tokens, "output_tokens": output,
            "cache_creation_input_tokens": r.cache_write_tokens,
            "cache_read_input_tokens": r.cache_read_tokens}


def _blocks(r: Reply) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if r.text:
        out.append({"type": "text", "text": r.text})
    for c in r.calls:
        out.append({"type": "tool_use", "id": _id("toolu", c.id), "name": c.name,
                    "input": c.arguments if isinstance(c.arguments, dict) else
                    {"input": c.arguments}})
    return out


def message(r: Reply, model: str, msg_id: str) -> dict[str, Any]:
    """The non-streamed response body."""
    return {"id": _id("msg", msg_id), "type": "message", "role": "assistant", "model": model,
            "content": _blocks(r), "stop_reason": r.stop_reason, "stop_sequence": None,
            "usage": _usage(r, r.output_tokens)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _chunks(s: str) -> list[str]:
    return [s[i:i + CHUNK] for i in range(0, len(s), CHUNK)] or [""]


def stream(r: Reply, model: str, msg_id: str) -> Iterator[bytes]:
    """The SSE events of a streamed response, one ``event:``/``data:`` pair each."""
    start = message(r, model, msg_id)
    start.update(content=[], stop_reason=None, usage=_usage(r, 1))
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    for i, block in enumerate(_blocks(r)):
        if block["type"] == "text":
            yield _event("content_block_start", {"type": "content_block_start", "index": i,
                                                 "content_block": {"type": "text", "text": ""}})
            for piece in _chunks(block["text"]):
                yield _event("content_block_delta", {
                    "type": "content_block_delta", "index": i,
                    "delta": {"type": "text_delta", "text": piece}})
        else:
            yield _event("content_block_start", {
                "type": "content_block_start", "index": i,
                "content_block": {**block, "input": {}}})
            for piece in _chunks(json.dumps(block["input"])):
                yield _event("content_block_delta", {
                    "type": "content_block_delta", "index": i,
                    "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": i})
    yield _event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": r.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": r.output_tokens}})
    yield _event("message_stop", {"type": "message_stop"})


def error(status: int, text: str, kind: str | None = None) -> dict[str, Any]:
    """The error body the API sends with ``status`` (``kind``: the error type)."""
    return {"type": "error", "error": {"type": kind or _ERROR_TYPES.get(status, "api_error"),
                                       "message": text}}


def count_tokens(size: int) -> dict[str, Any]:
    """``POST /v1/messages/count_tokens``: an estimate from the body size."""
    return {"input_tokens": max(1, size // 4)}
