"""The sandbox lifecycle, driven at random against a model of the legal moves."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral import InvalidState, Sandbox, SandboxNotFound, SandboxState
from corral.compute import states

S = SandboxState


class Lifecycle(RuleBasedStateMachine):
    """Model: the state, and the content of /workspace/v as the sandbox should see it."""

    def __init__(self) -> None:
        super().__init__()
        self.sbx = Sandbox.create(metadata={"test": "lifecycle"})
        self.state = S.RUNNING
        self.value = ""
        self.snaps: dict[str, str] = {}

    def teardown(self) -> None:
        self.sbx.destroy()

    def _attempt(self, op: str, fn: object) -> bool:
        legal = self.state in states.LEGAL[op]
        if legal:
            fn()  # type: ignore[operator]
        else:
            with pytest.raises(InvalidState) as info:
                fn()  # type: ignore[operator]
            assert self.state.value in str(info.value)
        return legal

    @rule()
    def pause(self) -> None:
        if self._attempt("pause", self.sbx.pause):
            self.state = S.PAUSED

    @rule()
    def unpause(self) -> None:
        if self._attempt("unpause", self.sbx.unpause):
            self.state = S.RUNNING

    @rule()
    def stop(self) -> None:
        if self._attempt("stop", self.sbx.stop):
            self.state = S.STOPPED

    @rule()
    def resume(self) -> None:
        if self._attempt("resume", self.sbx.resume):
            self.state = S.RUNNING

    @rule(text=st.text("abcxyz", min_size=1, max_size=5))
    def write(self, text: str) -> None:
        # through a command when running, through files otherwise
        if self.state is S.RUNNING:
            assert self.sbx.commands.run(f"printf %s {text} > /workspace/v").ok
        else:
            self.sbx.files.write("/workspace/v", text)
        self.value = text

    @rule(name=st.sampled_from(["s1", "s2", "s3"]))
    def snapshot(self, name: str) -> None:
        snap = self.sbx.snapshot(name)
        self.snaps[snap.id] = self.value
        assert self.sbx.state is self.state

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        self.sbx.restore(sid)
        self.value = self.snaps[sid]
        if self.state is S.PAUSED:
            self.state = S.RUNNING

    @invariant()
    def matches_model(self) -> None:
        assert self.sbx.state is self.state
        seen = self.sbx.files.read("/workspace/v").decode() if self.sbx.files.exists(
            "/workspace/v") else ""
        assert seen == self.value
        if self.state is S.RUNNING:
            assert self.sbx.commands.run("cat /workspace/v 2>/dev/null; true").stdout == seen


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=6, stateful_step_count=12, deadline=None)


def test_illegal_calls_name_the_state(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidState, match="running"):
        sandbox.unpause()
    with pytest.raises(InvalidState, match="running"):
        sandbox.resume()
    sandbox.stop()
    with pytest.raises(InvalidState, match="stopped"):
        sandbox.pause()
    sandbox.destroy()
    with pytest.raises(InvalidState, match="destroyed"):
        sandbox.destroy()
    with pytest.raises(SandboxNotFound, match="destroyed"):
        Sandbox.connect(sandbox.id)


def test_unknown_id() -> None:
    with pytest.raises(SandboxNotFound, match="sb-nope"):
        Sandbox.connect("sb-nope")


def test_dead_init_is_reconciled_to_stopped(sandbox: Sandbox) -> None:
    import os
    import signal

    sandbox.files.write("/workspace/keep", "1")
    pid = sandbox._row().runtime["init_pid"]
    os.kill(pid, signal.SIGKILL)
    import time

    time.sleep(0.2)
    again = Sandbox.connect(sandbox.id)
    assert again.state is S.STOPPED
    assert "ended unexpectedly" in again.info()["error"]
    again.resume()
    assert again.commands.run("cat keep").stdout == "1"


def test_list_filters_by_metadata() -> None:
    a = Sandbox.create(metadata={"task": "T-1", "team": "x"})
    b = Sandbox.create(metadata={"task": "T-2", "team": "x"})
    try:
        assert [s.id for s in Sandbox.list(metadata={"task": "T-1"})] == [a.id]
        assert {s.id for s in Sandbox.list(metadata={"team": "x"})} == {a.id, b.id}
        b.destroy()
        assert [s.id for s in Sandbox.list(metadata={"team": "x"})] == [a.id]
        assert b.id in {s.id for s in Sandbox.list(metadata={"team": "x"},
                                                  include_destroyed=True)}
    finally:
        a.destroy()


def test_abandoned_create_is_finished_off_and_not_listed() -> None:
    import time

    from sqlalchemy import update

    from corral.store.models import SandboxRow

    sbx = Sandbox.create(metadata={"test": "abandoned"})
    # what a process killed in the middle of create leaves: the row says creating
    with sbx._ctx.store.session() as s:
        s.execute(update(SandboxRow).where(SandboxRow.id == sbx.id).values(state="creating"))
    time.sleep(2.2)
    assert Sandbox.list(metadata={"test": "abandoned"}) == []
    assert sbx.state is S.DESTROYED
    assert not (sbx._ctx.home / "sandboxes" / sbx.id).exists()
