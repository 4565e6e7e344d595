"""Claude Code's ``--output-format stream-json --verbose`` lines -> neutral events.

What the CLI prints (2.1.x), one JSON object per line, each with ``session_id``:

- ``system/init``: the session starts (model, cwd, tools);
  ``system/api_retry``: a failed model call about to be retried;
- ``assistant``: one content block of a model message (``text`` or
  ``tool_use``), repeated per block with the same ``message.id`` and the usage
  known when the message started (its output count is not final);
- ``user``: tool results (``tool_result`` blocks plus ``tool_use_result``
  details: stdout/stderr for Bash, the patch for Edit/Write);
- ``result``: the run ended: ``is_error``, the final text, ``num_turns``, and
  the run's exact total ``usage`` and ``total_cost_usd``.

Usage is reported as it becomes known: the input side of every model message
when it first appears, then at ``result`` the rest of the run's total (the
output tokens and anything not seen), so the events add up to exactly what
the API reported, the same figures the proxy meters.

State is keyed by ids that are unique across sessions (tool use ids, message
ids, session ids), so one parser may read several runs at once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from corral.harness.events import Event, EventKind, finished, message, output, usage

#: tools whose success means a file was written
_FILE_TOOLS = {"Write": "write", "Edit": "edit", "MultiEdit": "edit", "NotebookEdit": "edit"}
_EXIT = re.compile(r"(?:Exit code|exit code:?)\s+(\d+)")


class ClaudeParser:
    """Stateful reader of one or more Claude Code stream-json outputs."""

    def __init__(self) -> None:
        self._tools: dict[str, tuple[str, dict[str, Any]]] = {}
        self._messages: set[str] = set()
        #: session id -> input-side tokens already reported in the current run
        self._seen: dict[str, dict[str, int]] = {}

    def feed(self, line: str, stream: str = "stdout") -> list[Event]:
        """Events for one output line (stderr and non-JSON lines become ``output``)."""
        if stream != "stdout" or not line.startswith("{"):
            return [output(line, stream)] if line.strip() else []
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return [output(line, stream)]
        if not isinstance(obj, dict):
            return [output(line, stream)]
        sid = str(obj.get("session_id") or "")
        handler = {"system": self._system, "assistant": self._assistant,
                   "user": self._user, "result": self._result}.get(str(obj.get("type")))
        if handler is None:
            return [output(line, stream)]
        try:
            return handler(obj, sid)
        except (AttributeError, TypeError, ValueError):
            # a shape this version does not know: keep the line, lose nothing else
            return [output(line, stream)]

    # -- line kinds --------------------------------------------------------------
    def _system(self, obj: dict[str, Any], sid: str) -> list[Event]:
        sub = obj.get("subtype")
        if sub == "init":
            self._seen[sid] = {"input_tokens": 0, "cache_read_tokens": 0,
                               "cache_write_tokens": 0}
            return [Event(EventKind.OUTPUT, {
                "stream": "stdout", "text": f"session {sid} started", "session_id": sid,
                "model": obj.get("model"), "version": obj.get("claude_code_version"),
                "cwd": obj.get("cwd")})]
        if sub == "api_retry":
            return [Event(EventKind.ERROR, {
                "message": f"model call failed ({obj.get('error_status')} "
                           f"{obj.get('error')}), retry {obj.get('attempt')}/"
                           f"{obj.get('max_retries')}",
                "status": obj.get("error_status"), "retrying": True, "session_id": sid})]
        return [Event(EventKind.OUTPUT, {"stream": "stdout", "text": f"system {sub}",
                                         "session_id": sid})]

    def _assistant(self, obj: dict[str, Any], sid: str) -> list[Event]:
        msg = obj.get("message") or {}
        out: list[Event] = []
        mid = str(msg.get("id") or "")
        u = msg.get("usage") or {}
        if mid and mid not in self._messages and msg.get("model") != "<synthetic>":
            self._messages.add(mid)
            seen = self._seen.setdefault(sid, {"input_tokens": 0, "cache_read_tokens": 0,
                                               "cache_write_tokens": 0})
            ins = int(u.get("input_tokens") or 0)
            cr = int(u.get("cache_read_input_tokens") or 0)
            cw = int(u.get("cache_creation_input_tokens") or 0)
            seen["input_tokens"] += ins
            seen["cache_read_tokens"] += cr
            seen["cache_write_tokens"] += cw
            out.append(usage(ins, 0, cache_read_tokens=cr, cache_write_tokens=cw,
                             model=msg.get("model"), session_id=sid))
        for block in msg.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and block.get("text"):
                synthetic = msg.get("model") == "<synthetic>"
                ev = message(block["text"], session_id=sid)
                out.append(Event(EventKind.ERROR, {"message": block["text"],
                                                   "session_id": sid}) if synthetic else ev)
            elif block.get("type") == "tool_use":
                name = str(block.get("name"))
                raw = block.get("input")
                args: dict[str, Any] = raw if isinstance(raw, dict) else {}
                tid = str(block.get("id") or "")
                self._tools[tid] = (name, args)
                out.append(Event(EventKind.TOOL_CALL, {"name": name, "input": args, "id": tid,
                                                       "session_id": sid}))
        return out

    def _user(self, obj: dict[str, Any], sid: str) -> list[Event]:
        msg = obj.get("message") or {}
        detail = obj.get("tool_use_result")
        out: list[Event] = []
        content = msg.get("content")
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            name, args = self._tools.pop(str(block.get("tool_use_id") or ""), ("", {}))
            failed = bool(block.get("is_error"))
            text = _text(block.get("content"))
            if name == "Bash":
                code = 0
                if failed:
                    m = _EXIT.search(text)
                    code = int(m.group(1)) if m else 1
                out.append(Event(EventKind.COMMAND, {
                    "command": args.get("command", ""), "exit_code": code,
                    "output": _tail(_bash_output(detail) or text), "session_id": sid}))
            elif name in _FILE_TOOLS and not failed:
                action = _FILE_TOOLS[name]
                if isinstance(detail, dict) and detail.get("type") == "create":
                    action = "create"
                out.append(Event(EventKind.FILE_EDIT, {
                    "path": args.get("file_path") or args.get("notebook_path") or "",
                    "action": action, "tool": name, "session_id": sid}))
        return out

    def _result(self, obj: dict[str, Any], sid: str) -> list[Event]:
        out: list[Event] = []
        u = obj.get("usage") or {}
        seen = self._seen.pop(sid, {"input_tokens": 0, "cache_read_tokens": 0,
                                    "cache_write_tokens": 0})
        rest_in = max(0, int(u.get("input_tokens") or 0) - seen["input_tokens"])
        rest_cr = max(0, int(u.get("cache_read_input_tokens") or 0) - seen["cache_read_tokens"])
        rest_cw = max(0, int(u.get("cache_creation_input_tokens") or 0)
                      - seen["cache_write_tokens"])
        out_tok = int(u.get("output_tokens") or 0)
        cost = obj.get("total_cost_usd")
        if rest_in or out_tok or rest_cr or rest_cw or cost:
            out.append(usage(rest_in, out_tok, cost_usd=float(cost) if cost else None,
                             cache_read_tokens=rest_cr, cache_write_tokens=rest_cw,
                             session_id=sid, final=True))
        text = str(obj.get("result") or "")
        if obj.get("is_error"):
            out.append(Event(EventKind.ERROR, {"message": text or str(obj.get("subtype")),
                                               "status": obj.get("api_error_status"),
                                               "session_id": sid}))
        ev = finished(1 if obj.get("is_error") else 0, text or None)
        ev.data.update(session_id=sid, turns=obj.get("num_turns"),
                       duration_ms=obj.get("duration_ms"))
        out.append(ev)
        return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _bash_output(detail: Any) -> str:
    if not isinstance(detail, dict):
        return ""
    return "\n".join(x for x in (str(detail.get("stdout") or ""),
                                 str(detail.get("stderr") or "")) if x)


def _tail(s: str, limit: int = 2000) -> str:
    return s if len(s) <= limit else "..." + s[-limit:]
