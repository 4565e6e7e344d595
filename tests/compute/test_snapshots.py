"""Snapshots: restore, fork, the snapshot tree, deletion rules, consistency."""

from __future__ import annotations

import time

import pytest

from corral import Sandbox, SnapshotNotFound, UsageError


def test_restore_in_place(sandbox: Sandbox) -> None:
    sandbox.commands.run("echo good > /workspace/state; echo tmp > /tmp/t")
    snap = sandbox.snapshot("before-risky-fix")
    sandbox.commands.run("rm -rf /workspace/state /tmp/t; echo broken > /workspace/other")
    sandbox.restore("before-risky-fix")
    r = sandbox.commands.run("cat /workspace/state /tmp/t; ls /workspace")
    assert r.stdout.split() == ["good", "tmp", "state"]
    assert [s.id for s in sandbox.snapshots()] == [snap.id]


def test_restore_ends_processes_and_keeps_stopped_stopped(sandbox: Sandbox) -> None:
    snap = sandbox.snapshot()
    sandbox.commands.run(["sleep", "60"], background=True)
    sandbox.restore(snap)
    assert "sleep 60" not in sandbox.commands.run("ps -eo args=").stdout
    sandbox.stop()
    sandbox.restore(snap.id)
    assert sandbox.state.value == "stopped"


def test_fork_many_independent(sandbox: Sandbox) -> None:
    sandbox.files.write("/workspace/base", "b\n")
    snap = sandbox.snapshot("base")
    forks = Sandbox.fork(snap, count=3, metadata={"try": "n"})
    try:
        for i, f in enumerate(forks):
            f.commands.run(f"echo {i} > /workspace/mine")
        for i, f in enumerate(forks):
            assert f.commands.run("cat base mine").stdout.split() == ["b", str(i)]
            assert f.metadata["forked_from"] == snap.id
        assert not sandbox.files.exists("/workspace/mine")
        # snapshots of a fork have the fork's origin as parent: a tree
        child = forks[0].snapshot("child")
        assert child.parent_id == snap.id
        grand = Sandbox.fork(child)[0]
        try:
            assert grand.commands.run("cat base mine").stdout.split() == ["b", "0"]
        finally:
            grand.destroy()
    finally:
        for f in forks:
            f.destroy()


def test_snapshot_names(sandbox: Sandbox) -> None:
    with pytest.raises(SnapshotNotFound, match="nope"):
        sandbox.restore("nope")
    with pytest.raises(UsageError):
        sandbox.snapshot("snap-reserved")
    other = Sandbox.create()
    try:
        mine = sandbox.snapshot("same")
        theirs = other.snapshot("same")
        sandbox.restore("same")  # the sandbox's own snapshot wins
        with pytest.raises(UsageError, match="ambiguous"):
            Sandbox.fork("same")
        assert Sandbox.fork(theirs.id)[0].destroy() is None
        assert mine.id != theirs.id
    finally:
        other.destroy()


def test_delete_snapshot(sandbox: Sandbox) -> None:
    snap = sandbox.snapshot("gone")
    Sandbox.delete_snapshot(snap)
    assert sandbox.snapshots() == []
    with pytest.raises(SnapshotNotFound):
        sandbox.restore(snap.id)


def test_snapshot_of_a_running_writer_is_consistent(sandbox: Sandbox) -> None:
    # each generation is written to a temp file and renamed: a consistent
    # snapshot never holds a torn file, and the two files always agree
    sandbox.commands.run(
        "i=0; while :; do i=$((i+1)); seq $i > a.tmp && mv a.tmp a; "
        "seq $i > b.tmp && mv b.tmp b; done", background=True)
    time.sleep(0.2)
    snaps = [sandbox.snapshot() for _ in range(5)]
    for snap in snaps:
        f = Sandbox.fork(snap)[0]
        try:
            a = f.files.read("/workspace/a").decode().split()
            assert a == [str(i) for i in range(1, len(a) + 1)]  # not torn
        finally:
            f.destroy()


def test_restore_of_a_paused_sandbox_runs_again(sandbox: Sandbox) -> None:
    snap = sandbox.snapshot()
    sandbox.pause()
    sandbox.restore(snap)  # regression: the new init joined a still-frozen cgroup
    assert sandbox.state.value == "running"
    assert sandbox.commands.run("echo up", timeout=10).stdout == "up\n"
    sandbox.pause()
    sandbox.stop()
    sandbox.resume()
    assert sandbox.commands.run("echo again", timeout=10).stdout == "again\n"
