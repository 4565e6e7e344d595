"""The hash-chained audit log: appends from many processes, and verify() on tampering."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.security.audit import (
    GENESIS,
    AuditLog,
    install_audit,
    record_hash,
    uninstall_audit,
)


def fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.append("request.allowed", sandbox=f"sb-{i % 2}", task="T-1", actor="proxy",
                   details={"i": i, "url": f"https://a.test/{i}"})


def test_append_chain_and_fields(audit: AuditLog) -> None:
    r1 = audit.append("sandbox.created", sandbox="sb-1", details={"env": "default"})
    r2 = audit.append("request.denied", sandbox="sb-1", task="T-9", actor="proxy",
                      details={"reason": "no"})
    assert (r1.seq, r2.seq) == (1, 2)
    assert r1.prev_hash == GENESIS and r2.prev_hash == r1.hash
    assert r1.time.endswith("+00:00")
    line = json.loads(audit.path.read_text().splitlines()[1])
    assert set(line) == {"seq", "time", "sandbox", "task", "actor", "event", "details",
                         "prev_hash", "hash"}
    assert record_hash(line) == line["hash"] == r2.hash
    assert audit.verify().ok and audit.verify().records == 2
    assert audit.path.stat().st_mode & 0o777 == 0o600


def test_a_second_handle_continues_the_chain(tmp_path: Path, audit: AuditLog) -> None:
    fill(audit, 3)
    other = AuditLog(audit.path)
    assert other.append("x").seq == 4
    assert audit.append("y").seq == 5  # the first handle notices the other's append
    assert audit.verify().ok


def test_tail_and_filter(audit: AuditLog) -> None:
    fill(audit, 6)
    assert [r.seq for r in audit.tail(2)] == [5, 6]
    assert [r.seq for r in audit.tail(10, sandbox="sb-1")] == [2, 4, 6]
    assert AuditLog(audit.path.parent / "none.jsonl").tail() == []


def _lines(audit: AuditLog) -> list[str]:
    return audit.path.read_text().splitlines(keepends=True)


def test_verify_edited(audit: AuditLog) -> None:
    fill(audit)
    lines = _lines(audit)
    rec = json.loads(lines[2])
    rec["details"]["url"] = "https://evil.test/"
    lines[2] = json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n"
    audit.path.write_text("".join(lines))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 3 and res.line == 3
    assert "record 3" in str(res) and "edited" in str(res)


def test_verify_edited_and_rehashed(audit: AuditLog) -> None:
    fill(audit)
    lines = _lines(audit)
    rec = json.loads(lines[1])
    rec["event"] = "request.denied"
    rec["hash"] = record_hash(rec)
    lines[1] = json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n"
    audit.path.write_text("".join(lines))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 3  # the next record's prev_hash no longer fits


def test_verify_deleted(audit: AuditLog) -> None:
    fill(audit)
    lines = _lines(audit)
    del lines[1]
    audit.path.write_text("".join(lines))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 3 and "deleted" in str(res)


def test_verify_reordered(audit: AuditLog) -> None:
    fill(audit)
    lines = _lines(audit)
    lines[1], lines[2] = lines[2], lines[1]
    audit.path.write_text("".join(lines))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 3 and res.line == 2


def test_verify_truncated_mid_line_and_recovery(audit: AuditLog) -> None:
    fill(audit)
    data = audit.path.read_bytes()
    audit.path.write_bytes(data[:-20])
    res = audit.verify()
    assert not res.ok and res.line == 5 and "truncated" in str(res)
    # a later append ends the partial line and keeps chaining from the last good record
    AuditLog(audit.path).append("after.crash")
    res = AuditLog(audit.path).verify()
    assert not res.ok and res.line == 5 and "not a valid record" in str(res)


def test_verify_records_cut_off_the_end(audit: AuditLog) -> None:
    fill(audit)
    lines = _lines(audit)
    audit.path.write_text("".join(lines[:3]))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 4 and "deleted from the end" in str(res)


def test_verify_replaced_last_record(audit: AuditLog) -> None:
    fill(audit, 2)
    lines = _lines(audit)
    rec = json.loads(lines[1])
    rec["details"] = {"i": 99}
    rec["hash"] = record_hash(rec)
    lines[1] = json.dumps(rec) + "\n"
    audit.path.write_text("".join(lines))
    res = audit.verify()
    assert not res.ok and res.broken_seq == 2


def test_verify_empty_and_garbage(audit: AuditLog) -> None:
    assert audit.verify().ok and audit.verify().records == 0
    audit.path.write_text("not json\n")
    res = audit.verify()
    assert not res.ok and res.line == 1


def test_redactor(audit: AuditLog) -> None:
    audit.add_redactor(lambda s: s.replace("hunter2", "corral_sentinel"))
    audit.append("secret.injected", details={"h": ["x hunter2 y", {"k": "hunter2"}], "n": 3,
                                             "p": Path("/hunter2"), "f": float("nan")})
    text = audit.path.read_text()
    assert "hunter2" not in text and text.count("corral_sentinel") == 3
    assert audit.verify().ok


def _worker(path: str, n: int, max_bytes: int | None = None) -> None:
    log = AuditLog(path, max_bytes=max_bytes)
    for i in range(n):
        log.append("request.allowed", sandbox=f"sb-{os.getpid()}", details={"i": i})


def test_concurrent_appenders_in_many_processes(audit: AuditLog) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(audit.path), 60)) for _ in range(4)]
    for p in procs:
        p.start()
    _worker(str(audit.path), 60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = audit.verify()
    assert res.ok, str(res)
    assert res.records == 300
    assert [r.seq for r in audit.records()] == list(range(1, 301))


def test_compute_events_reach_the_log(tmp_path: Path) -> None:
    from corral.compute import events

    home = tmp_path / "home"
    log = install_audit(home, actor="user:test")
    try:
        assert install_audit(home) is log  # idempotent
        events.emit("sandbox.created", "sb-x", env="default", metadata={"task": "T-5"})
        events.emit("sandbox.stopped", "sb-x", reason="requested")
    finally:
        uninstall_audit(home)
    events.emit("sandbox.destroyed", "sb-x")
    recs = log.tail()
    assert [(r.event, r.sandbox, r.task, r.actor) for r in recs] == [
        ("sandbox.created", "sb-x", "T-5", "user:test"),
        ("sandbox.stopped", "sb-x", None, "user:test")]
    assert recs[0].details["env"] == "default"


def test_cli_entry_point_installs_the_listener(tmp_path: Path) -> None:
    # `corral` itself must register the audit listener (not only the test helper)
    code = ("import sys; from corral.cli import main as m; from corral.compute import events;"
            "m.app = lambda **k: (events.emit('sandbox.created', 'sb-cli'), 0)[1];"
            "m.main()")
    env = {**os.environ, "CORRAL_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    (rec,) = AuditLog(tmp_path / "audit.jsonl").tail()
    assert rec.event == "sandbox.created" and rec.sandbox == "sb-cli"
    assert rec.actor.startswith(("user:", "uid:"))


@pytest.mark.slow
def test_many_appends_stay_fast(audit: AuditLog) -> None:
    fill(audit, 5000)
    assert audit.verify().records == 5000


def test_append_many_chains_like_single_appends(audit: AuditLog) -> None:
    from corral.security.audit import Entry

    audit.add_redactor(lambda s: s.replace("hunter2", "corral_sentinel"))
    assert audit.append_many([]) == []
    audit.append("first")
    recs = audit.append_many([Entry("request.allowed", sandbox="sb-1", task="T-1",
                                    actor="proxy", details={"url": "https://a.test/hunter2"}),
                               Entry("dns.query", sandbox="sb-2", details={"name": "a.test"})])
    assert [r.seq for r in recs] == [2, 3]
    assert recs[1].prev_hash == recs[0].hash
    # another handle (another process, say) continues the chain after a batch
    AuditLog(audit.path).append("last")
    res = audit.verify()
    assert res.ok and res.records == 4, str(res)
    assert [(r.event, r.sandbox, r.task, r.actor) for r in audit.records()][1:3] == [
        ("request.allowed", "sb-1", "T-1", "proxy"), ("dns.query", "sb-2", None, "corral")]
    assert "hunter2" not in audit.path.read_text()


def test_append_many_after_a_crash_mid_line(audit: AuditLog) -> None:
    from corral.security.audit import Entry

    fill(audit, 3)
    audit.path.write_bytes(audit.path.read_bytes()[:-20])
    recs = AuditLog(audit.path).append_many([Entry("a"), Entry("b")])
    # the broken line is ended and the chain goes on from the last good record
    assert [r.seq for r in recs] == [3, 4]
    res = AuditLog(audit.path).verify()
    assert not res.ok and res.line == 3 and "not a valid record" in str(res)
    assert [r.seq for r in audit.records()] == [1, 2, 3, 4]


def test_redactors_change_while_other_threads_append(audit: AuditLog) -> None:
    """Brokers come and go (sandboxes attach and detach) while records are written:
    a redactor registered the whole time is never skipped. (With a list changed in
    place, removing redactors ahead of it mid-iteration skipped it.)"""
    import threading
    import time

    def slow(j: int):  # a redactor that lets other threads run
        def fn(s: str) -> str:
            time.sleep(0.0001)
            return s.replace(f"x{j}", "y")
        return fn

    others = [slow(j) for j in range(60)]
    for fn in others:
        audit.add_redactor(fn)
    audit.add_redactor(lambda s: s.replace("hunter2", "corral_sentinel"))
    done = threading.Event()

    def write() -> None:
        i = 0
        while not done.is_set():
            audit.append("secret.injected", details={"v": f"{i} hunter2"})
            i += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        for fn in others:  # detaching sandboxes, one by one
            time.sleep(0.0005)
            audit.remove_redactor(fn)
    finally:
        done.set()
        t.join()
    assert "hunter2" not in audit.path.read_text()
    assert audit.verify().ok


def test_audit_writer_process_writes_batches(tmp_path: Path) -> None:
    """The proxy's writer child: JSON lines in, one chained record each out (an
    unreadable line is skipped with an error, never breaking the chain)."""
    lines = [json.dumps({"event": "request.allowed", "sandbox": "sb-1", "task": None,
                         "actor": "proxy", "details": {"i": i}}) for i in range(500)]
    lines.insert(7, "not json")
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / "audit.jsonl"
    r = subprocess.run([sys.executable, "-m", "corral.security.proxy.auditwriter", str(path)],
                       input=data, capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    log = AuditLog(path)
    res = log.verify()
    assert res.ok and res.records == 500, str(res)
    assert [r.details["i"] for r in log.records()] == list(range(500))


def test_written_lines_are_the_canonical_json_of_their_records(audit: AuditLog) -> None:
    from corral.security.audit import Entry, _canonical

    audit.append_many([Entry("e", "sb-1", "T", "proxy", {"b": [1, 2.5, None], "a": "ü\n\""}),
                       Entry("f", details={"p": Path("/x"), "nan": float("nan")})])
    for raw in audit.path.read_bytes().splitlines():
        rec = json.loads(raw)
        assert _canonical(rec) == raw
        assert record_hash(rec) == rec["hash"]


# -- rotation ------------------------------------------------------------------------


def test_rotation_seals_segments_and_keeps_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000)
    fill(log, 40)
    segs = log.segments()
    assert len(segs) >= 3
    assert all(os.stat(p).st_mode & 0o777 == 0o400 for p in segs)  # sealed: read-only
    assert all(p.stat().st_size >= 2000 for p in segs)
    # each segment is named after its last record, and the next file goes on from it
    for seg in segs:
        last = json.loads(seg.read_text().splitlines()[-1])
        assert seg.name == f"audit.jsonl.{last['seq']:012d}"
    assert [r.seq for r in log.records()] == list(range(1, 41))
    res = log.verify()
    assert res.ok and res.records == 40, str(res)
    assert [r.seq for r in log.tail(25)] == list(range(16, 41))  # across files
    # another handle (another process, say) carries on the same chain
    AuditLog(tmp_path / "audit.jsonl", max_bytes=2000).append("x.y")
    assert log.verify().ok and log.verify().records == 41


def test_tampering_inside_a_sealed_segment_is_found(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000)
    fill(log, 30)
    seg = log.segments()[1]
    os.chmod(seg, 0o600)
    lines = seg.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["details"]["url"] = "https://evil.test/"
    lines[2] = json.dumps(rec)
    seg.write_text("\n".join(lines) + "\n")
    res = log.verify()
    assert not res.ok and res.broken_seq == rec["seq"] and res.line == 3
    assert res.file == seg.name and seg.name in str(res) and "edited" in str(res)


def test_a_missing_segment_shows_as_deleted_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000)
    fill(log, 30)
    first, second = log.segments()[:2]
    gone_from = int(first.name.rsplit(".", 1)[1]) + 1
    second.unlink()
    res = log.verify()
    assert not res.ok and res.broken_seq is not None and res.broken_seq > gone_from
    assert f"expected seq {gone_from}" in str(res) and "deleted" in str(res)
    first.unlink()  # the oldest gone too: the chain no longer starts at 1
    assert not log.verify().ok


def test_concurrent_appenders_across_rotations(tmp_path: Path) -> None:
    """Processes appending while the log rotates under them: nothing lost, nothing
    twice, one chain, and every appender found the new live file."""
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), 80, 3000)) for _ in range(4)]
    for p in procs:
        p.start()
    _worker(str(path), 80, 3000)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = AuditLog(path)
    assert len(log.segments()) >= 10
    res = log.verify()
    assert res.ok, str(res)
    assert [r.seq for r in log.records()] == list(range(1, 401))


def test_follow_goes_on_across_a_rotation(tmp_path: Path) -> None:
    import threading

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1500)
    log.append("before")
    seen: list[int] = []

    def reader() -> None:
        for rec in log.follow(poll=0.02):
            seen.append(rec.seq)
            if rec.seq == 31:
                return

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    import time

    time.sleep(0.2)  # the reader is at the end of the live file
    fill(log, 30)
    th.join(20)
    assert not th.is_alive()
    assert len(log.segments()) >= 2
    assert seen == list(range(2, 32))
