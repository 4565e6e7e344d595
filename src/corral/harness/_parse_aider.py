"""Aider's output -> neutral events.

Aider has no machine-readable output of its own, so the adapter runs it with
``--no-pretty`` (plain text on stdout) and ``--analytics-log /dev/stderr``
(local JSON lines, sent nowhere: analytics stay disabled). Read from them:

- stdout ``{"corral_session": ...}``: the adapter's own first line (the chat
  history file a follow-up restores);
- stdout ``Applied edit to PATH``: a file written from an edit block;
- stdout ``litellm.SomeError: ...``: a failed model call (Aider exits 0 anyway);
- stdout ``{"corral_command": CMD, "exit_code": N}``: the adapter's wrapper
  around ``--test-cmd`` (which Aider runs after its edits without printing
  the command or its status) says it ran;
- stderr ``{"event": "message_send", "properties": {prompt_tokens,
  completion_tokens, cost}}``: exact usage of one model call (with
  ``--no-stream`` these are the API's own counts; the text line ``Tokens: 2.3k
  sent`` is rounded);
- everything else on stdout is the model's reply or Aider's notes: messages.
"""

from __future__ import annotations

import json
import re

from corral.harness.events import Event, EventKind, message, output, usage

_APPLIED = re.compile(r"^Applied edit to (.+?)\s*$")
_ERROR = re.compile(r"^litellm\.(\w+(?:Error|Exception))\b:?\s*(.*)$")
_RUNNING = re.compile(r"^Running (.+)$")
#: Aider's banner and bookkeeping lines: output, not messages
_NOTES = re.compile(r"^(Aider v\d|Model: |Git repo: |Repo-map: |Tokens: |Cost: |Warning: |"
                    r"https://aider\.chat/|Added \d+ lines? of output|Commit [0-9a-f]{7} |"
                    r"Analytics have been|Main model: |Weak model: |Editor model: |"
                    r"─+$|Retrying in |The API provider |Warning for |You can skip this)")


class AiderParser:
    """Reader of the adapter's Aider output (stateless)."""

    def feed(self, line: str, stream: str = "stdout") -> list[Event]:
        if not line.strip():
            return []
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                try:
                    return _json(obj, line, stream)
                except (AttributeError, TypeError, ValueError):
                    return [output(line, stream)]
        if stream != "stdout":
            return [output(line, stream)]
        m = _APPLIED.match(line)
        if m:
            return [Event(EventKind.FILE_EDIT, {"path": m.group(1), "action": "edit",
                                                "tool": "aider"})]
        m = _ERROR.match(line)
        if m:
            return [Event(EventKind.ERROR, {"message": line.strip(), "kind": m.group(1)})]
        m = _RUNNING.match(line)
        if m:
            return [Event(EventKind.TOOL_CALL, {"name": "run", "input": {"command": m.group(1)}})]
        if _NOTES.match(line):
            return [output(line, stream)]
        return [message(line)]


def _json(obj: dict[str, object], line: str, stream: str) -> list[Event]:
    if "corral_command" in obj:
        code = obj.get("exit_code")
        return [Event(EventKind.COMMAND, {"command": str(obj["corral_command"]),
                                          "exit_code": code if isinstance(code, int) else -1,
                                          "source": "test_command"})]
    if "corral_session" in obj:
        sid = str(obj["corral_session"])
        return [Event(EventKind.OUTPUT, {"stream": stream, "text": f"session {sid}",
                                         "session_id": sid})]
    name = obj.get("event")
    props = obj.get("properties")
    props = props if isinstance(props, dict) else {}
    if name == "message_send":
        cost = props.get("cost")
        return [usage(int(props.get("prompt_tokens") or 0),
                      int(props.get("completion_tokens") or 0),
                      cost_usd=float(cost) if isinstance(cost, int | float) and cost else None)]
    if name == "message_send_exception":
        return [Event(EventKind.ERROR, {"message": str(props.get("exception") or "")})]
    if isinstance(name, str):
        return []  # Aider's other analytics: launched, repo, exit...
    return [output(line, stream)]
