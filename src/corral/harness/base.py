"""The harness adapter interface: how the orchestrator drives one agent CLI.

An adapter is a plain object. It knows how to start its agent in a sandbox
with a prompt, how to send a follow-up in the same session, and how to turn the
agent's output into harness-neutral events (``corral.harness.events``). The
orchestrator does the rest (budgets, stuck detection, logs).

A *turn* is one agent process: ``start`` launches the first, ``follow_up`` the
next ones (the adapter passes its session id, e.g. ``--resume``). A turn runs as
a background command in the sandbox, so it survives a restart of the
orchestrator and ``attach`` picks it up again.

To add an adapter: subclass ``Harness``, set ``name``, implement ``launch``
(what to run for a prompt) and usually ``parse`` (one output line -> events),
and register it in ``corral.harness.ADAPTERS``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from corral.harness.events import Event, EventKind, finished, output

if TYPE_CHECKING:
    from corral.compute.commands import CommandHandle
    from corral.compute.sandbox import Sandbox

#: where adapters keep their files inside a sandbox (prompts, programs, scripts)
STATE_DIR = "/tmp/corral"


@dataclass(frozen=True)
class Prompt:
    """What to tell the agent, and why (the reaction that rendered it)."""

    text: str
    #: start | ci_failed | changes_requested | conflict | stuck | retry
    reaction: str = "start"
    #: how many times this reaction has been sent to this task (1 for the first)
    occurrence: int = 1


@dataclass(frozen=True)
class AgentContext:
    """Facts about the task an adapter may need to launch its agent."""

    task_id: str
    workdir: str = "/workspace"
    #: environment variables for the agent process
    env: Mapping[str, str] = field(default_factory=dict)
    #: per-task adapter options (the scripted harness reads ``script`` here)
    options: Mapping[str, Any] = field(default_factory=dict)
    #: a fresh number for every turn (names prompt files)
    turn: int = 1
    #: a file in the sandbox the turn waits for before the agent starts. The
    #: orchestrator writes it once the turn's command id is recorded, so that a
    #: crash in between never leaves an agent at work that nobody knows of.
    gate: str | None = None


@dataclass(frozen=True)
class Launch:
    """What ``launch`` asks for: files to write in the sandbox, then a command."""

    command: str | list[str]
    files: Mapping[str, bytes | str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


class Harness(ABC):
    """One kind of agent CLI. Subclasses implement ``launch`` and ``parse``."""

    #: the name used in ``agents.harness`` of corral.yaml
    name: ClassVar[str] = "base"
    #: the agent's events include ``usage`` reports of every model call it makes.
    #: When False and the sandbox is fenced, the orchestrator charges budgets from
    #: what the proxy metered for the sandbox and none of the usage events, so a
    #: turn is never counted twice (unfenced, the events are all there is).
    reports_usage: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    # -- what subclasses provide ---------------------------------------------
    def setup(self, sbx: Sandbox, ctx: AgentContext) -> None:  # noqa: B027 - optional hook
        """Prepare a fresh sandbox once before its first turn (copy a program in...)."""

    @abstractmethod
    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        """The command for one turn. ``session`` is the id of the session to continue
        (``None`` for a fresh one), as found in earlier events' ``session_id``."""

    def parse(self, line: str, stream: str) -> list[Event]:
        """Events for one line of the agent's output (default: raw output)."""
        return [output(line, stream)] if line.strip() else []

    # -- what the orchestrator calls ------------------------------------------
    def start(self, sbx: Sandbox, ctx: AgentContext, prompt: Prompt) -> Turn:
        """Start a fresh session with ``prompt``; returns at once."""
        return self._run(sbx, ctx, prompt, None)

    def follow_up(self, sbx: Sandbox, ctx: AgentContext, prompt: Prompt,
                  session: str | None) -> Turn:
        """Send ``prompt`` to the agent in the session it had (a new turn)."""
        return self._run(sbx, ctx, prompt, session)

    def attach(self, sbx: Sandbox, command_id: str) -> Turn:
        """The turn started earlier as background command ``command_id`` (after a
        restart of the orchestrator); its events are read again from the start."""
        return Turn(self, sbx, sbx.commands.connect(command_id))

    def _run(self, sbx: Sandbox, ctx: AgentContext, prompt: Prompt,
             session: str | None) -> Turn:
        spec = self.launch(ctx, prompt, session)
        for path, data in spec.files.items():
            sbx.files.write(path, data)
        env = {**ctx.env, **spec.env}
        cmd = spec.command if ctx.gate is None else gated(spec.command, ctx.gate)
        handle = sbx.commands.run(cmd, cwd=ctx.workdir, env=env, background=True)
        return Turn(self, sbx, handle)


#: waits for the gate file, then becomes the agent (same process: exec)
_GATE = ('g=$1; shift; while [ ! -e "$g" ]; do sleep 0.005; done; '
         'if [ "$1" = --shell ]; then [ -x /bin/bash ] && exec /bin/bash -c "$2"; '
         'exec /bin/sh -c "$2"; fi; exec "$@"')


def gated(command: str | list[str], gate: str) -> list[str]:
    """``command`` held back until the file ``gate`` exists (see ``AgentContext.gate``)."""
    argv = ["--shell", command] if isinstance(command, str) else [str(a) for a in command]
    return ["/bin/sh", "-c", _GATE, "corral-gate", gate, *argv]


def open_gate(sbx: Sandbox, gate: str) -> None:
    """Let a gated turn's agent start (idempotent)."""
    sbx.files.write(gate, b"")


class Turn:
    """One running agent process: read its events, wait for it, stop it."""

    def __init__(self, harness: Harness, sbx: Sandbox, handle: CommandHandle) -> None:
        self.harness = harness
        self.sandbox = sbx
        self.handle = handle
        self.id = handle.id
        self.exit_code: int | None = None
        self.session_id: str | None = None
        self._pos = {"stdout": 0, "stderr": 0}
        self._partial = {"stdout": b"", "stderr": b""}
        self._done = False

    @property
    def done(self) -> bool:
        """True once the process ended and every event was read by ``poll``."""
        return self._done

    def poll(self) -> list[Event]:
        """Events that arrived since the last call (never blocks). The last batch
        of a turn ends with a ``finished`` event carrying the exit code."""
        if self._done:
            return []
        code = self.handle.exit_code()  # before reading, so no output is missed
        out: list[Event] = []
        for stream in ("stdout", "stderr"):
            out += self._read(stream, final=code is not None)
        if code is not None:
            self.exit_code = code
            self._done = True
            if not any(e.kind is EventKind.FINISHED for e in out):
                out.append(finished(code))
            else:  # the agent's own 'finished' does not know how the process ended
                out = [e if e.kind is not EventKind.FINISHED
                       else Event(e.kind, {**e.data, "exit_code": code}, e.t) for e in out]
        for ev in out:
            sid = ev.data.get("session_id")
            if isinstance(sid, str) and sid:
                self.session_id = sid
        return out

    def _read(self, stream: str, *, final: bool) -> list[Event]:
        path: Path = self.handle._dir / stream  # the command's own output file
        try:
            with path.open("rb") as f:
                f.seek(self._pos[stream])
                chunk = f.read(4 << 20)
        except FileNotFoundError:
            return []
        if not chunk and not (final and self._partial[stream]):
            return []
        self._pos[stream] += len(chunk)
        data = self._partial[stream] + chunk
        lines = data.split(b"\n")
        self._partial[stream] = b"" if final else lines.pop()
        events: list[Event] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line:
                events += self.harness.parse(line, stream)
        return events

    @property
    def output_offset(self) -> int:
        """Bytes of output read so far (grows whenever the agent prints)."""
        return self._pos["stdout"] + self._pos["stderr"]

    def stop(self, grace: float = 1.0) -> None:
        """End the agent process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.handle.exit_code() is not None:
            return
        self.handle.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.handle.exit_code() is not None:
                return
            time.sleep(0.01)
        self.handle.kill(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.handle.pid, signal.SIGKILL)
