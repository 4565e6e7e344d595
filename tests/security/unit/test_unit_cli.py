"""``corral policy`` and ``corral audit``, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from corral.security.audit import AuditLog

CORRAL = [sys.executable, "-m", "corral.cli.main"]

POLICY = """\
network:
  default: deny
  rules:
    - {host: api.github.com, methods: [GET], paths: ["/repos/acme/app/**"], decision: allow}
    - {host: github.com, git: {push: {"refs/heads/main": ask, "refs/heads/*": allow}}}
secrets:
  GITHUB_TOKEN: {source: "env:GITHUB_TOKEN", hosts: [api.github.com]}
llm: {token_limit: 100000}
"""


def cli(home: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False, **kw)


def test_policy_check(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    r = cli(tmp_path, "policy", "check", str(p))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"ok: {p}: 2 rules") and "token limit 100000" in r.stdout
    r = cli(tmp_path, "policy", "check", str(p), "--json")
    assert json.loads(r.stdout)["ok"] is True
    p.write_text(POLICY.replace("decision: allow}", "decision: yes}"))
    r = cli(tmp_path, "policy", "check", str(p))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {p}:4: network.rules.0.decision: Input should be 'allow', 'deny' or 'ask'"]
    r = cli(tmp_path, "policy", "check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_policy_decide(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    r = cli(tmp_path, "policy", "decide", str(p), "GET",
            "https://api.github.com/repos/acme/app/issues", "--json")
    assert json.loads(r.stdout) == {"action": "allow", "reason": json.loads(r.stdout)["reason"],
                                    "rule": 0, "ref": None}
    r = cli(tmp_path, "policy", "decide", str(p), "POST",
            "https://github.com/acme/app.git/git-receive-pack", "--push", "refs/heads/main")
    assert r.stdout.startswith("ask (network.rules[1])")
    r = cli(tmp_path, "policy", "decide", str(p), "GET", "https://api.github.com/a%2fb")
    assert r.stdout.startswith("deny") and "%2F" in r.stdout


def test_audit_tail_verify_follow(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("request.allowed", sandbox=f"sb-{i % 2}", actor="proxy", details={"i": i})
    r = cli(tmp_path, "audit", "tail", "-n", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "4" and "request.allowed" in lines[0]
    r = cli(tmp_path, "audit", "tail", "--sandbox", "sb-1", "--json")
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["seq"] for x in recs] == [2, 4] and all(x["hash"] for x in recs)
    r = cli(tmp_path, "audit", "verify")
    assert r.returncode == 0 and "5 records" in r.stdout

    # --follow prints what other processes append
    env = {**os.environ, "CORRAL_HOME": str(tmp_path)}
    proc = subprocess.Popen([*CORRAL, "audit", "tail", "-n", "0", "--follow", "--json"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        log.append("approval.approved", sandbox="sb-9", actor="user:x")
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["event"] == "approval.approved"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]

    # tamper with record 3
    text = log.path.read_text().replace('"i":2', '"i":7')
    log.path.write_text(text)
    r = cli(tmp_path, "audit", "verify")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "record 3" in line and "edited" in line
    r = cli(tmp_path, "audit", "verify", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["broken_seq"] == 3
