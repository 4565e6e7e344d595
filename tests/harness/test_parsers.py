"""Each CLI's real output (captured by capture_fixtures.py from the pinned CLIs in
real sandboxes) maps to the neutral events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.harness._parse_aider import AiderParser
from corral.harness._parse_claude import ClaudeParser
from corral.harness._parse_codex import CodexParser
from corral.harness.events import Event, EventKind

FIX = Path(__file__).parent / "fixtures"
K = EventKind


def parse(parser, name: str, scenario: str) -> list[Event]:
    out: list[Event] = []
    for stream in ("stdout", "stderr"):
        for line in (FIX / name / f"{scenario}.{stream}").read_text().splitlines():
            out += parser.feed(line, stream)
    return out


def of(events: list[Event], kind: EventKind) -> list[Event]:
    return [e for e in events if e.kind is kind]


def tokens(events: list[Event]) -> tuple[int, int]:
    us = of(events, K.USAGE)
    return (sum(e.data["input_tokens"] for e in us), sum(e.data["output_tokens"] for e in us))


def _claude_result(scenario: str) -> dict:
    lines = (FIX / "claude-code" / f"{scenario}.stdout").read_text().splitlines()
    return json.loads(lines[-1])


def test_claude_fix_run():
    ev = parse(ClaudeParser(), "claude-code", "fix")
    sid = ev[0].data["session_id"]
    assert ev[0].kind is K.OUTPUT and sid
    assert all(e.data.get("session_id") == sid for e in ev)
    assert of(ev, K.MESSAGE)[0].data["text"] == "I'll fix calc.add and check it."
    assert [e.data["name"] for e in of(ev, K.TOOL_CALL)] == ["Read", "Write", "Read", "Edit",
                                                            "Bash"]
    edits = {(e.data["path"], e.data["action"]) for e in of(ev, K.FILE_EDIT)}
    assert edits == {("/workspace/NOTES.md", "create"), ("/workspace/calc.py", "edit")}
    (cmd,) = of(ev, K.COMMAND)
    assert cmd.data["command"] == "python3 check_calc.py" and cmd.data["exit_code"] == 0
    assert cmd.data["output"] == "calc ok"
    # usage adds up to the run's own total, as the API reported it per call
    total = _claude_result("fix")["usage"]
    assert tokens(ev) == (total["input_tokens"], total["output_tokens"])
    assert len(of(ev, K.USAGE)) == 3  # two model calls, then the rest at the end
    fin = ev[-1]
    assert fin.kind is K.FINISHED and fin.data["exit_code"] == 0
    assert fin.data["summary"] == "Fixed calc.add; check_calc.py passes."
    assert not of(ev, K.ERROR)


def test_claude_follow_up_resumes_the_session():
    first = parse(ClaudeParser(), "claude-code", "fix")[0].data["session_id"]
    ev = parse(ClaudeParser(), "claude-code", "followup")
    assert ev[0].data["session_id"] == first
    assert [e.data["path"] for e in of(ev, K.FILE_EDIT)] == ["/workspace/CHANGELOG.md"]
    total = _claude_result("followup")["usage"]
    assert tokens(ev) == (total["input_tokens"], total["output_tokens"])


def test_claude_budget_refusal_is_an_error_and_a_failed_finish():
    ev = parse(ClaudeParser(), "claude-code", "budget")
    errors = of(ev, K.ERROR)
    assert any("its limit is 50" in e.data["message"] for e in errors)
    assert any(e.data.get("status") == 429 for e in errors)
    assert tokens(ev) == (0, 0) and ev[-1].data["exit_code"] == 1


def test_claude_parser_is_shared_safely_between_runs():
    """One adapter reads many tasks at once: interleaved runs keep their own totals."""
    p = ClaudeParser()
    a = (FIX / "claude-code" / "fix.stdout").read_text().splitlines()
    b = (FIX / "claude-code" / "budget.stdout").read_text().splitlines()
    ev: list[Event] = []
    for i in range(max(len(a), len(b))):
        for lines in (a, b):
            if i < len(lines):
                ev += p.feed(lines[i])
    total = _claude_result("fix")["usage"]
    assert tokens(ev) == (total["input_tokens"], total["output_tokens"])
    assert sorted(e.data["exit_code"] for e in of(ev, K.FINISHED)) == [0, 1]


def _codex_completed(scenario: str) -> dict:
    lines = (FIX / "codex" / f"{scenario}.stdout").read_text().splitlines()
    return next(json.loads(ln) for ln in lines if '"turn.completed"' in ln)


def test_codex_fix_run():
    ev = parse(CodexParser(), "codex", "fix")
    assert ev[0].data["session_id"]
    assert [e.data["text"] for e in of(ev, K.MESSAGE)] == [
        "I'll fix calc.add and check it.", "Fixed calc.add; check_calc.py passes."]
    edits = [(e.data["path"], e.data["action"]) for e in of(ev, K.FILE_EDIT)]
    assert edits == [("/workspace/NOTES.md", "create"), ("/workspace/calc.py", "edit")]
    (cmd,) = of(ev, K.COMMAND)
    assert cmd.data["command"] == "/bin/bash -lc 'python3 check_calc.py'"
    assert cmd.data["exit_code"] == 0 and cmd.data["output"] == "calc ok\n"
    assert of(ev, K.TOOL_CALL)[0].data["name"] == "exec_command"
    last = _codex_completed("fix")
    assert tokens(ev) == (last["usage"]["input_tokens"], last["usage"]["output_tokens"])
    # the wrapper's after-marker repeats the total: nothing is counted twice
    assert len(of(ev, K.USAGE)) == 1


def test_codex_follow_up_and_budget():
    ev = parse(CodexParser(), "codex", "followup")
    fix = parse(CodexParser(), "codex", "fix")
    assert ev[0].data["session_id"] == fix[0].data["session_id"]
    # turn.completed after a resume counts the whole thread: events keep the difference
    last = _codex_completed("followup")
    thread = (last["usage"]["input_tokens"], last["usage"]["output_tokens"])
    assert tokens(ev) == (thread[0] - tokens(fix)[0], thread[1] - tokens(fix)[1])
    assert tokens(ev)[0] > 0
    assert [e.data["path"] for e in of(ev, K.FILE_EDIT)] == ["/workspace/CHANGELOG.md"]
    ev = parse(CodexParser(), "codex", "budget")
    assert [e.data["message"] for e in of(ev, K.ERROR)] == [
        "Quota exceeded. Check your plan and billing details."] * 2
    assert tokens(ev) == (0, 0)


def test_codex_failed_turn_still_reports_its_usage():
    """A turn that fails after model calls has no turn.completed: the wrapper's
    after-marker (the thread total from Codex's session log) carries the usage."""
    p = CodexParser()
    after = {"type": "event_msg", "payload": {"type": "token_count", "info": {
        "total_token_usage": {"input_tokens": 900, "output_tokens": 40}}}}
    ev = []
    for line in [json.dumps({"type": "thread.started", "thread_id": "t1"}),
                 json.dumps({"type": "turn.failed", "error": {"message": "Quota exceeded."}}),
                 json.dumps({"corral_codex_after": after})]:
        ev += p.feed(line)
    assert tokens(ev) == (900, 40)
    assert of(ev, K.ERROR)[0].data["message"] == "Quota exceeded."


def _aider_usage(scenario: str) -> tuple[int, int]:
    ins = outs = 0
    for line in (FIX / "aider" / f"{scenario}.stderr").read_text().splitlines():
        obj = json.loads(line)
        if obj["event"] == "message_send":
            ins += obj["properties"]["prompt_tokens"]
            outs += obj["properties"]["completion_tokens"]
    return ins, outs


def test_aider_fix_run():
    ev = parse(AiderParser(), "aider", "fix")
    assert ev[0].data["session_id"] == "/tmp/corral/aider/chat.history.md"
    assert sorted(e.data["path"] for e in of(ev, K.FILE_EDIT)) == ["NOTES.md", "calc.py"]
    (cmd,) = of(ev, K.COMMAND)  # the --test-cmd run, not the suggested ```bash block
    assert cmd.data["command"] == "python3 check_calc.py" and cmd.data["exit_code"] == 0
    assert any(e.data["text"] == "I'll fix calc.add and check it." for e in of(ev, K.MESSAGE))
    # exact usage from the analytics log, not the rounded "Tokens: 2.8k sent" line
    assert tokens(ev) == _aider_usage("fix") and tokens(ev)[0] > 2000
    assert len(of(ev, K.USAGE)) == 2
    assert not any("Tokens:" in e.data.get("text", "") for e in of(ev, K.MESSAGE))
    assert not of(ev, K.ERROR)


def test_aider_follow_up_and_budget():
    ev = parse(AiderParser(), "aider", "followup")
    assert [e.data["path"] for e in of(ev, K.FILE_EDIT)] == ["CHANGELOG.md"]
    assert tokens(ev) == _aider_usage("followup")
    ev = parse(AiderParser(), "aider", "budget")
    errors = of(ev, K.ERROR)
    assert errors and all(e.data["kind"] == "RateLimitError" for e in errors)
    assert tokens(ev) == (0, 0)


@pytest.mark.parametrize("parser", [ClaudeParser(), CodexParser(), AiderParser()])
def test_garbage_is_output_never_a_crash(parser):
    for line in ["", "not json", "{", "[1, 2]", '{"type": "assistant", "message": 3}',
                 '{"type": "item.completed", "item": "x"}', '{"event": 5}']:
        for ev in parser.feed(line, "stdout") + parser.feed(line, "stderr"):
            assert isinstance(ev, Event)
