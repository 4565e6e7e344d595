"""Policy reload: edits apply within a second; a broken edit keeps the last good policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.security.audit import AuditLog
from corral.security.reload import LivePolicy
from corral.security.types import RequestView


def view(host: str) -> RequestView:
    return RequestView(sandbox_id="sb-1", scheme="https", host=host, port=443, method="GET",
                       path="/")


def write(p: Path, text: str) -> None:
    # write-then-rename, as editors do; also works for in-place writes (tested below)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def wait_for(pred, timeout: float = 1.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_edit_applies_within_a_second(tmp_path: Path, audit: AuditLog) -> None:
    p = tmp_path / "policy.yaml"
    write(p, "network: {rules: [{host: a.test, decision: allow}]}\n")
    live = LivePolicy(p, audit=audit, sandbox="sb-1")
    assert live.decide(view("a.test")).action == "allow"
    assert live.decide(view("b.test")).action == "deny"
    write(p, "network: {rules: [{host: b.test, decision: allow}]}\n")
    took = wait_for(lambda: live.decide(view("b.test")).action == "allow")
    assert took < 1.0
    assert live.decide(view("a.test")).action == "deny"
    (rec,) = [r for r in audit.records() if r.event == "policy.reloaded"]
    assert rec.sandbox == "sb-1" and "1 rules" in rec.details["summary"]


def test_in_place_edit_of_same_size_is_noticed(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text("network: {rules: [{host: a.test, decision: allow}]}\n")
    live = LivePolicy(p, interval=0)
    assert live.decide(view("a.test")).action == "allow"
    with open(p, "r+") as f:  # same inode, same size, maybe the same mtime tick
        f.write("network: {rules: [{host: b.test, decision: allow}]}\n")
    res = live.reload()
    assert res is not None and res.ok
    assert live.decide(view("b.test")).action == "allow"


def test_broken_edit_keeps_last_good_and_reports(tmp_path: Path, audit: AuditLog) -> None:
    p = tmp_path / "policy.yaml"
    write(p, "network: {rules: [{host: a.test, decision: allow}]}\n")
    live = LivePolicy(p, audit=audit, interval=0)
    write(p, "network:\n  rules:\n    - {host: b.test, decision: perhaps}\n")
    res = live.reload()
    assert res is not None and not res.ok
    assert res.error.startswith(f"{p}:3: network.rules.0.decision:")
    assert live.last_error == res.error
    assert live.decide(view("a.test")).action == "allow"  # the last good policy
    assert live.decide(view("b.test")).action == "deny"
    assert live.reload() is None  # unchanged since: nothing new to report
    (rec,) = [r for r in audit.records() if r.event == "policy.rejected"]
    assert rec.details["error"] == res.error
    # deleting the file is also a broken edit
    p.unlink()
    res = live.reload()
    assert res is not None and not res.ok and "no such file" in res.error
    assert live.decide(view("a.test")).action == "allow"
    write(p, "network: {default: ask}\n")
    res = live.reload()
    assert res is not None and res.ok and live.last_error is None
    assert live.decide(view("z.test")).action == "ask"


def test_unchanged_content_is_not_a_reload(tmp_path: Path, audit: AuditLog) -> None:
    p = tmp_path / "policy.yaml"
    write(p, "network: {default: ask}\n")
    live = LivePolicy(p, audit=audit, interval=0)
    write(p, "network: {default: ask}\n")  # new inode, same content
    assert live.reload() is None
    assert list(audit.records()) == []


def test_listeners_and_first_load_errors(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    write(p, "secrets: {}\n")
    live = LivePolicy(p, interval=0)
    seen = []
    live.on_change(lambda pol: seen.append(pol.network.default))
    write(p, "network: {default: ask}\n")
    live.reload()
    assert seen == ["ask"]
    assert live.upstream("x.test", 443) is None
    write(p, "network: {default: nope}\n")
    with pytest.raises(ConfigError):
        LivePolicy(p)


def test_checks_are_rate_limited(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    write(p, "network: {default: deny}\n")
    live = LivePolicy(p, interval=60)
    write(p, "network: {default: ask}\n")
    assert live.decide(view("a.test")).action == "deny"  # not checked yet
    assert live.reload() is not None
    assert live.decide(view("a.test")).action == "ask"
