"""Codex CLI's ``exec --json`` lines -> neutral events.

What the CLI prints (0.17x), one JSON object per line:

- ``thread.started {thread_id}``: the session (``exec resume THREAD`` continues it);
- ``turn.started``; ``turn.completed {usage}`` with the turn's exact totals
  (``input_tokens`` includes ``cached_input_tokens``); ``turn.failed {error}``;
- ``item.started`` / ``item.updated`` / ``item.completed {item}``, where an item is
  ``agent_message {text}``, ``reasoning {text}``, ``command_execution {command,
  aggregated_output, exit_code, status}``, ``file_change {changes: [{path,
  kind}]}``, ``mcp_tool_call``, ``web_search``, ``todo_list`` or ``error
  {message}`` (a warning: the run goes on);
- ``error {message}``: a failed model call (``Reconnecting... n/5`` while it
  retries, then the final reason).

``turn.completed`` carries the *thread's* total so far: after ``exec resume``
it includes the earlier turns, and a turn that fails has none. So the adapter
prints the thread's total from Codex's own session log (``rollout-*.jsonl``,
its last ``token_count``) before resuming (``{"corral_codex_before": ...}``)
and after Codex exits (``{"corral_codex_after": ...}``); usage events are the
differences, and add up to what the API reported for this turn's calls. One
parser reads one turn.
"""

from __future__ import annotations

import json
from typing import Any

from corral.harness.events import Event, EventKind, message, output, usage

_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_input_tokens",
           "reasoning_output_tokens")


class CodexParser:
    """Reader of one Codex ``exec --json`` run."""

    def __init__(self) -> None:
        self._before = dict.fromkeys(_FIELDS, 0)

    def feed(self, line: str, stream: str = "stdout") -> list[Event]:
        try:
            return self._feed(line, stream)
        except (AttributeError, TypeError, ValueError):
            return [output(line, stream)]  # a shape this version does not know

    def _feed(self, line: str, stream: str) -> list[Event]:
        if stream != "stdout" or not line.startswith("{"):
            return [output(line, stream)] if line.strip() else []
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return [output(line, stream)]
        if not isinstance(obj, dict):
            return [output(line, stream)]
        kind = str(obj.get("type") or "")
        if kind == "thread.started":
            tid = str(obj.get("thread_id") or "")
            return [Event(EventKind.OUTPUT, {"stream": "stdout",
                                             "text": f"session {tid} started",
                                             "session_id": tid})]
        if "corral_codex_before" in obj:
            total = _find_total(obj["corral_codex_before"])
            if total:
                self._before = {k: int(total.get(k) or 0) for k in _FIELDS}
            return []
        if "corral_codex_after" in obj:
            total = _find_total(obj["corral_codex_after"])
            return self._usage(total, final=True) if total else []
        if kind == "turn.completed":
            return self._usage(obj.get("usage") or {})
        if kind == "turn.failed":
            err = obj.get("error") or {}
            return [Event(EventKind.ERROR, {"message": str(err.get("message") or err)})]
        if kind == "error":
            text = str(obj.get("message") or "")
            return [Event(EventKind.ERROR, {"message": text,
                                            "retrying": text.startswith("Reconnecting")})]
        if kind in ("item.started", "item.completed"):
            item = obj.get("item")
            if isinstance(item, dict):
                return _item(item, done=kind == "item.completed")
            return []
        if kind in ("turn.started", "item.updated"):
            return []
        return [output(line, stream)]


    def _usage(self, total: dict[str, Any], final: bool = False) -> list[Event]:
        """A usage event for what ``total`` (the thread's) adds to what was reported."""
        now = {k: int(total.get(k) or 0) for k in _FIELDS}
        d = {k: max(0, now[k] - self._before[k]) for k in _FIELDS}
        self._before = {k: max(now[k], self._before[k]) for k in _FIELDS}
        if final and not any(d.values()):
            return []
        return [usage(d["input_tokens"], d["output_tokens"],
                      cache_read_tokens=d["cached_input_tokens"],
                      cache_write_tokens=d["cache_write_input_tokens"],
                      reasoning_tokens=d["reasoning_output_tokens"],
                      thread_tokens=now["input_tokens"] + now["output_tokens"])]


def _item(item: dict[str, Any], *, done: bool) -> list[Event]:
    kind = item.get("type")
    if kind == "command_execution":
        if not done:
            return [Event(EventKind.TOOL_CALL, {"name": "exec_command",
                                                "input": {"command": item.get("command")},
                                                "id": item.get("id")})]
        code = item.get("exit_code")
        return [Event(EventKind.COMMAND, {
            "command": item.get("command", ""),
            "exit_code": int(code) if isinstance(code, int) else -1,
            "output": _tail(str(item.get("aggregated_output") or "")),
            "status": item.get("status")})]
    if not done:
        return []
    if kind == "agent_message":
        return [message(str(item.get("text") or ""))]
    if kind == "reasoning":
        return [message(str(item.get("text") or ""), reasoning=True)]
    if kind == "file_change":
        if item.get("status") not in (None, "completed"):
            return [Event(EventKind.ERROR, {"message": "a patch failed to apply",
                                            "changes": item.get("changes")})]
        return [Event(EventKind.FILE_EDIT, {"path": str(c.get("path") or ""),
                                            "action": _ACTIONS.get(str(c.get("kind")), "edit"),
                                            "tool": "apply_patch"})
                for c in item.get("changes") or [] if isinstance(c, dict)]
    if kind == "mcp_tool_call":
        return [Event(EventKind.TOOL_CALL, {"name": f"{item.get('server')}.{item.get('tool')}",
                                            "input": item.get("arguments"),
                                            "id": item.get("id")})]
    if kind == "web_search":
        return [Event(EventKind.TOOL_CALL, {"name": "web_search",
                                            "input": {"query": item.get("query")},
                                            "id": item.get("id")})]
    if kind == "error":
        return [Event(EventKind.ERROR, {"message": str(item.get("message") or ""),
                                        "warning": True})]
    if kind == "todo_list":
        items = item.get("items") or []
        return [message("\n".join(f"[{'x' if i.get('completed') else ' '}] {i.get('text')}"
                                  for i in items if isinstance(i, dict)), plan=True)]
    return []


def _find_total(obj: Any) -> dict[str, Any] | None:
    """``total_token_usage`` anywhere inside a rollout line."""
    if isinstance(obj, dict):
        if isinstance(obj.get("total_token_usage"), dict):
            return dict(obj["total_token_usage"])
        for v in obj.values():
            found = _find_total(v)
            if found:
                return found
    return None


_ACTIONS = {"add": "create", "update": "edit", "delete": "delete"}


def _tail(s: str, limit: int = 2000) -> str:
    return s if len(s) <= limit else "..." + s[-limit:]
