"""The stuck ladder, driven by a virtual clock: ten minutes of silence in milliseconds."""

from __future__ import annotations

import threading

from tests.orchestrator.conftest import Project, events, finish, task_state

from corral.orchestrator import stuck
from corral.testing.clock import VirtualClock


def test_rungs() -> None:
    assert [stuck.rung(i).value for i in (1, 2, 3, 4, 9)] == [
        "nudge", "different_approach", "fresh_session", "needs_human", "needs_human"]
    assert stuck.repeated(["a", "b", "b", "b"], 3) and not stuck.repeated(["a", "b", "b"], 3)
    assert stuck.no_progress(["x", "y", "y", "y"], 2) and not stuck.no_progress(["y", "y"], 2)


def _drive_clock(clock: VirtualClock, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        clock.advance(120)  # two virtual minutes every 50 ms


def test_stuck_ladder_climbs_to_a_human(project: Project) -> None:
    project.write_plan([{"id": "mute", "title": "Silent agent", "script": {
        "start": [{"say": "thinking"}, {"hang": True}],
        "stuck": [{"hang": True}],
        "retry": [{"hang": True}]}}],
        stuck={"silence": "10m"}, agents={"harness": "scripted", "turn_timeout": "30d"})
    clock = VirtualClock()
    orch = project.orchestrator(clock=clock)
    stop = threading.Event()
    th = threading.Thread(target=_drive_clock, args=(clock, stop), daemon=True)
    th.start()
    try:
        st = finish(orch, timeout=60)
    finally:
        stop.set()
    t = task_state(st, "mute")
    assert t["state"] == "needs_human"
    ladder = [e.data["rung"] for e in events(orch, "mute") if e.kind == "stuck"]
    assert ladder == ["nudge", "different_approach", "fresh_session", "needs_human"]
    sent = [e.data for e in events(orch, "mute") if e.kind == "reaction"]
    assert [d["reaction"] for d in sent] == ["start", "stuck", "stuck", "retry"]
    assert "try a different approach" in sent[2]["prompt"]
    assert "no output and no workspace change for 600s" in sent[1]["prompt"]
    assert t["attempts"] == 2  # the fresh session is a new sandbox


def test_nudge_unsticks(project: Project) -> None:
    project.write_plan([{"id": "slow", "title": "Needs a nudge", "script": {
        "start": [{"hang": True}],
        "stuck": [{"write": {"path": "s.txt", "content": "done\n"}}, {"commit": "s"}]}}],
        stuck={"silence": "10m"}, agents={"harness": "scripted", "turn_timeout": "30d"})
    clock = VirtualClock()
    orch = project.orchestrator(clock=clock)
    stop = threading.Event()
    threading.Thread(target=_drive_clock, args=(clock, stop), daemon=True).start()
    try:
        st = finish(orch, timeout=60)
    finally:
        stop.set()
    assert task_state(st, "slow")["state"] == "merged"
    assert project.show("s.txt") == "done\n"
