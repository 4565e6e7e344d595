"""Turning a scripted turn into a reply the calling client understands.

``write`` / ``edit`` / ``run`` become the client's own tools when it offers them
(Claude Code: ``Read`` + ``Write`` / ``Edit``, ``Bash``; Codex: ``apply_patch``,
``exec_command`` / ``shell``), else edit blocks and fenced commands in the text
(Aider and other tool-less chat clients: whole-file listings, or SEARCH/REPLACE
blocks when the system prompt asks for them).
"""

from __future__ import annotations

import json
import math
import posixpath
import shlex
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.testing.fakellm.conversation import Conversation
from corral.testing.fakellm.script import Append, Edit, Script, ToolCall, Turn, Write


@dataclass
class Call:
    """One tool call of a reply."""

    name: str
    #: a JSON object for function tools, a string for free-form (custom) tools
    arguments: dict[str, Any] | str
    kind: Literal["function", "custom"] = "function"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else \
            json.dumps(self.arguments)


@dataclass
class Reply:
    """What the fake model answers, independent of the wire format."""

    text: str
    calls: list[Call]
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    status: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @property
    def stop_reason(self) -> str:
        return "tool_use" if self.calls else "end_turn"


def build(turn: Turn, conv: Conversation, script: Script, body_size: int) -> Reply:
    """The reply for ``turn`` to the request ``conv`` (``body_size`` bytes)."""
    cwd = conv.cwd or script.cwd
    text = turn.text or ""
    calls: list[Call] = []
    side = conv.api != "chat" and not conv.tools
    if side and turn.status is None:
        # a side request of a tool-using client (a title, a summary): never act
        text = turn.text or script.side_text
    else:
        blocks: list[str] = []
        for action in turn.actions():
            if isinstance(action, ToolCall):
                calls.append(Call(action.name, dict(action.arguments)))
            elif conv.tools:
                calls.extend(_as_tools(action, conv.tools, cwd))
            else:
                blocks.append(_as_text(action, conv, cwd))
        if blocks:
            text = "\n\n".join([t for t in (text,) if t] + blocks) + "\n"
    out_chars = len(text) + sum(len(c.name) + len(c.arguments_json()) for c in calls)
    u = turn.usage
    return Reply(
        text=text, calls=calls,
        input_tokens=u.input_tokens if u.input_tokens is not None else
        max(1, math.ceil(body_size / 4)),
        output_tokens=u.output_tokens if u.output_tokens is not None else
        max(1, math.ceil(out_chars / 4)),
        cache_read_tokens=u.cache_read_tokens, cache_write_tokens=u.cache_write_tokens,
        status=turn.status, error=turn.error, error_type=turn.error_type,
        error_body=dict(turn.error_body) if turn.error_body is not None else None,
        headers=dict(turn.headers), delay=turn.delay)


def _abs(path: str, cwd: str) -> str:
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(cwd, path))


def _rel(path: str, cwd: str) -> str:
    if not path.startswith("/"):
        return path
    rel = posixpath.relpath(path, cwd)
    return path if rel.startswith("..") else rel


def _shell_write(w: Write, cwd: str) -> str:
    path = _abs(w.path, cwd)
    marker = "CORRAL_EOF"
    body = w.content if w.content.endswith("\n") or not w.content else w.content + "\n"
    return (f"mkdir -p {shlex.quote(posixpath.dirname(path))} && cat > {shlex.quote(path)} "
            f"<<'{marker}'\n{body}{marker}")


def _shell_append(a: Append, cwd: str) -> str:
    path = _abs(a.path, cwd)
    marker = "CORRAL_EOF"
    body = a.content if a.content.endswith("\n") or not a.content else a.content + "\n"
    return f"cat >> {shlex.quote(path)} <<'{marker}'\n{body}{marker}"


def _shell_edit(e: Edit, cwd: str) -> str:
    prog = ("import sys,pathlib;p=pathlib.Path(sys.argv[1]);s=p.read_text();"
            "assert sys.argv[2] in s,'old text not found';"
            "p.write_text(s.replace(sys.argv[2],sys.argv[3],1))")
    return " ".join(shlex.quote(a) for a in
                    ("python3", "-c", prog, _abs(e.path, cwd), e.old, e.new))


def _patch(action: Write | Edit, cwd: str) -> str:
    """A Codex ``apply_patch`` patch: "Add File" (which also overwrites) for a write,
    "Update File" with whole lines for an edit."""
    path = _rel(action.path, cwd)
    if isinstance(action, Write):
        lines = "".join(f"+{ln}\n" for ln in action.content.splitlines())
        return f"*** Begin Patch\n*** Add File: {path}\n{lines}*** End Patch\n"
    old = "".join(f"-{ln}\n" for ln in action.old.splitlines())
    new = "".join(f"+{ln}\n" for ln in action.new.splitlines())
    return f"*** Begin Patch\n*** Update File: {path}\n@@\n{old}{new}*** End Patch\n"


def _shell_call(tools: dict[str, str], command: str, cwd: str) -> Call:
    if "exec_command" in tools:
        return Call("exec_command", {"cmd": command, "workdir": cwd})
    if "shell" in tools:
        return Call("shell", {"command": ["bash", "-lc", command], "workdir": cwd})
    if "shell_command" in tools:
        return Call("shell_command", {"command": command, "workdir": cwd})
    return Call("Bash", {"command": command, "description": "Run a command"})


def _as_tools(action: Write | Append | Edit | str, tools: dict[str, str],
              cwd: str) -> list[Call]:
    """Calls of the client's own tools for one action."""
    if isinstance(action, str):
        return [_shell_call(tools, action, cwd)]
    if isinstance(action, Append):  # no client has an append tool: the shell does it
        return [_shell_call(tools, _shell_append(action, cwd), cwd)]
    if "Write" in tools and "Edit" in tools:  # Claude Code: it must Read before it writes
        path = _abs(action.path, cwd)
        read = Call("Read", {"file_path": path})
        if isinstance(action, Write):
            return [read, Call("Write", {"file_path": path, "content": action.content})]
        return [read, Call("Edit", {"file_path": path, "old_string": action.old,
                                    "new_string": action.new})]
    # apply_patch matches whole lines: an edit of part of a line goes through the shell
    if "apply_patch" in tools and (isinstance(action, Write) or action.old.endswith("\n")):
        patch = _patch(action, cwd)
        if tools["apply_patch"] == "custom":
            return [Call("apply_patch", patch, kind="custom")]
        return [Call("apply_patch", {"input": patch})]
    command = _shell_write(action, cwd) if isinstance(action, Write) else \
        _shell_edit(action, cwd)
    return [_shell_call(tools, command, cwd)]


def _as_text(action: Write | Append | Edit | str, conv: Conversation, cwd: str) -> str:
    """An edit block or a fenced command, in the format the client's prompt asks for."""
    if isinstance(action, str):
        return f"```bash\n{action}\n```"
    path = _rel(action.path, cwd)
    if "<<<<<<< SEARCH" in conv.text:
        # an empty SEARCH creates a new file or appends to an existing one (Aider)
        old, new = ("", action.content) if isinstance(action, Write | Append) else \
            (action.old, action.new)
        return (f"{path}\n```\n<<<<<<< SEARCH\n{_nl(old)}=======\n{_nl(new)}"
                f">>>>>>> REPLACE\n```")
    if isinstance(action, Edit | Append):
        raise ValueError(f"{type(action).__name__.lower()} needs a client that takes "
                         "SEARCH/REPLACE blocks or tools; use write for whole-file clients")
    return f"{path}\n```\n{_nl(action.content)}```"


def _nl(s: str) -> str:
    return s if not s or s.endswith("\n") else s + "\n"
