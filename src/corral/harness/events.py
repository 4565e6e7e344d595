"""Harness-neutral agent events, and their JSONL form.

Every adapter turns what its agent CLI prints into these few kinds, so the
orchestrator (budgets, stuck detection, logs, the dashboard) never needs to know
which agent ran. Each attempt's events are kept as one JSONL file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class EventKind(StrEnum):
    """What an agent did, in one vocabulary for every harness."""

    #: text the agent wrote for humans (its reasoning, a summary, a question)
    MESSAGE = "message"
    #: the agent called one of its tools (name, input)
    TOOL_CALL = "tool_call"
    #: the agent ran a shell command (command, exit_code)
    COMMAND = "command"
    #: the agent created, changed or deleted a file (path, action)
    FILE_EDIT = "file_edit"
    #: model usage (input_tokens, output_tokens, optional cost_usd)
    USAGE = "usage"
    #: something went wrong inside the agent (message)
    ERROR = "error"
    #: the turn ended (exit_code, optional summary)
    FINISHED = "finished"
    #: raw output an adapter did not interpret (stream, text)
    OUTPUT = "output"


@dataclass(frozen=True)
class Event:
    """One thing an agent did. ``data`` holds the kind's fields (see ``EventKind``)."""

    kind: EventKind
    data: dict[str, Any] = field(default_factory=dict)
    #: wall-clock time (seconds since the epoch) the event was read
    t: float = field(default_factory=time.time)

    @property
    def tokens(self) -> int:
        """Total tokens of a usage event (0 for other kinds)."""
        if self.kind is not EventKind.USAGE:
            return 0
        return int(self.data.get("input_tokens", 0)) + int(self.data.get("output_tokens", 0))

    @property
    def cost_usd(self) -> float:
        if self.kind is not EventKind.USAGE:
            return 0.0
        return float(self.data.get("cost_usd", 0.0) or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 6), "kind": self.kind.value, **self.data}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        """Read back one JSONL record; an unknown kind becomes ``output``."""
        data = dict(obj)
        t = float(data.pop("t", time.time()))
        raw = str(data.pop("kind", "output"))
        try:
            kind = EventKind(raw)
        except ValueError:
            kind = EventKind.OUTPUT
            data["original_kind"] = raw
        return cls(kind, data, t)


def message(text: str, **extra: Any) -> Event:
    return Event(EventKind.MESSAGE, {"text": text, **extra})


def output(text: str, stream: str = "stdout") -> Event:
    return Event(EventKind.OUTPUT, {"stream": stream, "text": text})


def usage(input_tokens: int = 0, output_tokens: int = 0, cost_usd: float | None = None,
          **extra: Any) -> Event:
    data: dict[str, Any] = {"input_tokens": int(input_tokens),
                            "output_tokens": int(output_tokens), **extra}
    if cost_usd is not None:
        data["cost_usd"] = float(cost_usd)
    return Event(EventKind.USAGE, data)


def finished(exit_code: int, summary: str | None = None) -> Event:
    data: dict[str, Any] = {"exit_code": exit_code}
    if summary:
        data["summary"] = summary
    return Event(EventKind.FINISHED, data)


class EventLog:
    """Append-only JSONL file of one attempt's events (one writer, any readers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, events: list[Event]) -> None:
        if not events:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for ev in events:
                f.write(json.dumps(ev.to_json(), default=str) + "\n")

    def read(self) -> list[Event]:
        return list(iter_events(self.path))


def iter_events(path: Path) -> Iterator[Event]:
    """The events of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield Event.from_json(obj)
