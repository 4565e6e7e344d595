"""OpenAI Responses API: ``POST /v1/responses``, streamed (SSE) or JSON.

A streamed reply is ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added``, its deltas and
``response.output_item.done``, and ``response.completed`` carrying ``usage``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from corral.testing.fakellm.actions import Reply

CHUNK = 24


def _items(r: Reply, rid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if r.text:
        out.append({"id": f"msg_{rid}", "type": "message", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": r.text, "annotations": []}]})
    for c in r.calls:
        if c.kind == "custom":
            out.append({"id": f"ctc_{c.id}", "type": "custom_tool_call",
                        "status": "completed", "call_id": f"call_{c.id}", "name": c.name,
                        "input": c.arguments_json()})
        else:
            out.append({"id": f"fc_{c.id}", "type": "function_call", "status": "completed",
                        "call_id": f"call_{c.id}", "name": c.name,
                        "arguments": c.arguments_json()})
    return out


def _usage(r: Reply) -> dict[str, Any]:
    return {"input_tokens": r.input_tokens,
            "input_tokens_details": {"cached_tokens": r.cache_read_tokens},
            "output_tokens": r.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": r.input_tokens + r.output_tokens}


def response(r: Reply, model: str, rid: str, *, status: str = "completed") -> dict[str, Any]:
    """The response object (the JSON body, or the payload of created/completed)."""
    done = status == "completed"
    return {"id": f"resp_{rid}", "object": "response", "created_at": int(time.time()),
            "status": status, "error": None, "incomplete_details": None, "model": model,
            "output": _items(r, rid) if done else [], "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "usage": _usage(r) if done else None}


def _event(seq: int, data: dict[str, Any]) -> bytes:
    data = {"type": data["type"], "sequence_number": seq,
            **{k: v for k, v in data.items() if k != "type"}}
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def stream(r: Reply, model: str, rid: str) -> Iterator[bytes]:
    seq = 0

    def ev(data: dict[str, Any]) -> bytes:
        nonlocal seq
        seq += 1
        return _event(seq - 1, data)

    yield ev({"type": "response.created",
              "response": response(r, model, rid, status="in_progress")})
    yield ev({"type": "response.in_progress",
              "response": response(r, model, rid, status="in_progress")})
    for idx, item in enumerate(_items(r, rid)):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield ev({"type": "response.output_item.added", "output_index": idx,
                      "item": {**item, "status": "in_progress", "content": []}})
            yield ev({"type": "response.content_part.added", "item_id": item["id"],
                      "output_index": idx, "content_index": 0,
                      "part": {"type": "output_text", "text": "", "annotations": []}})
            for i in range(0, len(text), CHUNK):
                yield ev({"type": "response.output_text.delta", "item_id": item["id"],
                          "output_index": idx, "content_index": 0,
                          "delta": text[i:i + CHUNK]})
            yield ev({"type": "response.output_text.done", "item_id": item["id"],
                      "output_index": idx, "content_index": 0, "text": text})
            yield ev({"type": "response.content_part.done", "item_id": item["id"],
                      "output_index": idx, "content_index": 0,
                      "part": item["content"][0]})
        else:
            key = "arguments" if item["type"] == "function_call" else "input"
            delta_type = ("response.function_call_arguments" if key == "arguments"
                          else "response.custom_tool_call_input")
            yield ev({"type": "response.output_item.added", "output_index": idx,
                      "item": {**item, "status": "in_progress", key: ""}})
            payload = item[key]
            for i in range(0, len(payload), CHUNK):
                yield ev({"type": f"{delta_type}.delta", "item_id": item["id"],
                          "output_index": idx, "delta": payload[i:i + CHUNK]})
            yield ev({"type": f"{delta_type}.done", "item_id": item["id"],
                      "output_index": idx, key: payload})
        yield ev({"type": "response.output_item.done", "output_index": idx, "item": item})
    yield ev({"type": "response.completed", "response": response(r, model, rid)})


def error(status: int, text: str, kind: str | None = None) -> dict[str, Any]:
    """The error body the API sends with ``status`` (``kind``: type and code)."""
    kind = kind or {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "server_error")
    return {"error": {"message": text, "type": kind, "param": None,
                      "code": kind if status in (402, 403, 429) else None}}
