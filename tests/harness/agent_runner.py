"""Running a real agent CLI through its adapter in a real sandbox, against a
fake model server listening inside the sandbox's own network namespace."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from corral.compute.sandbox import Sandbox
from corral.harness import AgentContext, Event, Harness, Prompt, Turn
from corral.harness.events import EventKind


@dataclass
class TurnResult:
    events: list[Event]
    stdout: bytes
    stderr: bytes
    exit_code: int | None
    session_id: str | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def kinds(self, kind: EventKind) -> list[Event]:
        return [e for e in self.events if e.kind is kind]

    def tokens(self) -> tuple[int, int]:
        us = self.kinds(EventKind.USAGE)
        return (sum(int(e.data.get("input_tokens", 0)) for e in us),
                sum(int(e.data.get("output_tokens", 0)) for e in us))


def run_turn(harness: Harness, sbx: Sandbox, ctx: AgentContext, prompt: Prompt,
             session: str | None = None, timeout: float = 240.0) -> TurnResult:
    """Start (or follow up) one turn and read it to the end."""
    t0 = time.monotonic()
    turn: Turn = (harness.follow_up(sbx, ctx, prompt, session) if session
                  else harness.start(sbx, ctx, prompt))
    events: list[Event] = []
    while not turn.done:
        events += turn.poll()
        if time.monotonic() - t0 > timeout:
            turn.stop()
            raise TimeoutError(f"{harness.name} turn ran over {timeout}s")
        time.sleep(0.05)
    return TurnResult(events, turn.handle.stdout(), turn.handle.stderr(), turn.exit_code,
                      turn.session_id, time.monotonic() - t0)


def destroy_home(home) -> None:
    """Stop the proxy daemon of a corral home, destroy its sandboxes, release its
    storage and remove it (what tests/conftest.py does for the session's home)."""
    import shutil
    from pathlib import Path

    from corral.compute.local.storage import release
    from corral.security.daemon import DaemonClient

    home = Path(home)
    DaemonClient(home).stop()
    if (home / "corral.db").exists():
        for sbx in Sandbox.list(home=home):
            sbx.destroy()
    release(home)
    shutil.rmtree(home, ignore_errors=True)
