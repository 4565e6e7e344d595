"""Reading a model API request: which API, which model, what the user asked,
how far the conversation went, which tools the client offers, and where it runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Api = Literal["anthropic", "responses", "chat"]

#: where the clients say their working directory is
_CWD_PATTERNS = (
    re.compile(r"<cwd>([^<\n]+)</cwd>"),  # Codex's environment context
    re.compile(r"(?:Primary working directory|Working directory|cwd): *(/[^\s`'\"]*)"),
)


@dataclass
class Conversation:
    """The parts of one request the script and the renderers need."""

    api: Api
    model: str
    stream: bool
    #: each user prompt (not a tool result), oldest first, with the number of
    #: assistant turns the request holds after it
    prompts: list[tuple[str, int]] = field(default_factory=list)
    #: the tools the client offers: name -> kind (function, custom, ...)
    tools: dict[str, str] = field(default_factory=dict)
    #: the client's working directory if its prompts say, else None
    cwd: str | None = None
    #: every text of the request joined (system prompt included): for format hints
    text: str = ""
    #: Chat Completions: the client asked for a usage chunk
    include_usage: bool = False


def _texts(content: Any) -> list[str]:
    """Text parts of a message's content (string or list of blocks)."""
    if isinstance(content, str):
        return [content]
    out = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                t = block.get("text")
                if isinstance(t, str):
                    out.append(t)
    return out


def _has_tool_result(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def _tool_kinds(tools: Any) -> dict[str, str]:
    out = {}
    for t in tools if isinstance(tools, list) else []:
        if not isinstance(t, dict):
            continue
        name = t.get("name") or (t.get("function") or {}).get("name")
        if isinstance(name, str):
            out[name] = str(t.get("type") or "function")
    return out


def read(api: Api, body: dict[str, Any], replay: tuple[str, ...] = ()) -> Conversation:
    """Normalize a request body of ``api``; tolerant of anything missing.

    A user message containing one of ``replay`` is the client asking the model to
    answer its last turn again (Aider after adding the files the answer named):
    it is not a prompt, and the assistant turn before it does not count.
    """
    conv = Conversation(api=api, model=str(body.get("model") or ""),
                        stream=bool(body.get("stream")), tools=_tool_kinds(body.get("tools")))
    all_text: list[str] = []
    prompts: list[list[Any]] = []  # [text, assistant_turns_after]
    if api == "anthropic":
        all_text += _texts(body.get("system"))
        for msg in body.get("messages") or []:
            if not isinstance(msg, dict):
                continue
            role, content = msg.get("role"), msg.get("content")
            texts = _texts(content)
            all_text += texts
            if role == "assistant":
                for p in prompts:
                    p[1] += 1
            elif role == "user" and texts and not _has_tool_result(content):
                prompts.append(["\n".join(texts), 0])
    elif api == "chat":
        opts = body.get("stream_options")
        conv.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        for msg in body.get("messages") or []:
            if not isinstance(msg, dict):
                continue
            role, texts = msg.get("role"), _texts(msg.get("content"))
            all_text += texts
            if role == "assistant":
                for p in prompts:
                    p[1] += 1
            elif role == "user" and texts:
                joined = "\n".join(texts)
                if any(marker in joined for marker in replay):
                    for p in prompts:
                        p[1] = max(0, p[1] - 1)
                else:
                    prompts.append([joined, 0])
    else:
        all_text += _texts(body.get("instructions"))
        items = body.get("input")
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": items}]
        in_turn = False
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            kind, role = item.get("type", "message"), item.get("role")
            model_made = (kind == "message" and role == "assistant") or kind in (
                "function_call", "custom_tool_call", "local_shell_call", "reasoning")
            if model_made:
                if not in_turn:
                    for p in prompts:
                        p[1] += 1
                in_turn = True
                continue
            in_turn = False
            if kind == "message":
                texts = _texts(item.get("content"))
                all_text += texts
                if role == "user" and texts:
                    prompts.append(["\n".join(texts), 0])
    conv.prompts = [(str(t), int(n)) for t, n in prompts]
    conv.text = "\n".join(all_text)
    for pat in _CWD_PATTERNS:
        m = pat.search(conv.text)
        if m:
            conv.cwd = m.group(1).strip().rstrip(".")
            break
    return conv


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The JSON object of a request body, or None."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
