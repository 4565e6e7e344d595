"""Budgets enforced by the proxy, for any harness: fenced sandboxes, the real proxy
(HTTPS interception, the model key injected), the fake model server, and the
``command`` harness calling the model with curl. The harness reports no usage of
its own: the task is charged what the proxy metered, and the proxy holds each
sandbox to what is left of the attempt, task and run budgets."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from tests.orchestrator.conftest import (
    finish,
    git,
    publish,
    run_in_thread,
    task_state,
    wait_for,
)

from corral.orchestrator.engine import Orchestrator
from corral.orchestrator.plan import load_plan
from corral.testing.fakellm import FakeLLM

pytestmark = pytest.mark.root

HOST = "api.anthropic.com"
REAL_KEY = "sk-live-budget-0123456789"
#: the agent: calls the model once per argument (``wait`` waits for /tmp/corral-go
#: first), prints each answer's status, claims a usage it never had (the command
#: harness's usage lines are not what it is charged), then leaves a file behind.
#: The last argument is corral's prompt.
AGENT = r"""#!/bin/sh
n=$#
for tag in "$@"; do
  [ "$n" -le 1 ] && break
  n=$((n - 1))
  if [ "$tag" = wait ]; then
    while [ ! -e /tmp/corral-go ]; do sleep 0.05; done
    continue
  fi
  msg='{"role": "user", "content": "'$tag'"}'
  body='{"model": "claude-test", "max_tokens": 64, "messages": ['$msg']}'
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -H "x-api-key: $ANTHROPIC_API_KEY" -H 'anthropic-version: 2023-06-01' \
    --data-binary "$body" https://api.anthropic.com/v1/messages)
  echo "$tag $code"
  sleep 1  # the proxy records a call's usage just after its answer
done
echo '{"kind": "usage", "input_tokens": 999}'
echo "$CORRAL_TASK" > "done-$CORRAL_TASK.txt"
"""


def _turn(tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {"text": "ok", "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}


class Fenced:
    """A repo whose corral.yaml fences every sandbox (the model host allowed, its key
    a secret), a bare origin, a fake model provider behind the proxy."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch,
                 model_rules: list[dict[str, Any]]) -> None:
        monkeypatch.setenv("CORRAL_TEST_MODEL_KEY", REAL_KEY)
        ca = trustme.CA()
        ca_file = root / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(HOST).configure_cert(ctx)
        self.llm = FakeLLM({"rules": model_rules}, ssl_context=ctx, api_key=REAL_KEY).start()
        policy = {  # no llm.token_limit: the budgets alone limit the sandboxes
            "network": {"default": "deny", "rules": [{"host": HOST, "decision": "allow"}]},
            "secrets": {"ANTHROPIC_API_KEY": {"source": "env:CORRAL_TEST_MODEL_KEY",
                                              "hosts": [HOST]}},
            "upstreams": {"extra_ca": str(ca_file),
                          "resolve": {f"{HOST}:443": f"127.0.0.1:{self.llm.port}"}},
            "llm": {"hosts": {HOST: "anthropic"}},
        }
        seed = root / "seed"
        seed.mkdir()
        (seed / "agent.sh").write_text(AGENT)
        (seed / "corral.yaml").write_text(yaml.safe_dump(
            {"ci": {"command": "true", "timeout": "1m"}, "policy": policy}))
        self.origin, self.repo = publish(seed)
        self.plan = root / "plan.yaml"

    def orchestrator(self, tasks: list[dict[str, Any]], budgets: dict[str, int],
                     max_parallel: int = 1) -> Orchestrator:
        self.plan.write_text(yaml.safe_dump({
            "agents": {"harness": "command", "max_parallel": max_parallel, "max_attempts": 1,
                       "turn_timeout": "90s"},
            "budgets": budgets,
            "tasks": [{"id": tid, "title": f"Task {tid}",
                       "options": {"command": "sh agent.sh " + " ".join(calls)}}
                      for tid, calls in tasks]}))
        plan = load_plan(self.repo, self.plan)
        return Orchestrator.create(plan, self.repo, origin=str(self.origin),
                                   plan_path=self.plan)

    def close(self) -> None:
        self.llm.stop()


@pytest.fixture
def fenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made: list[Fenced] = []

    def make(rules: list[dict[str, Any]]) -> Fenced:
        made.append(Fenced(tmp_path, monkeypatch, rules))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _refusals(orch: Orchestrator, task: str) -> list[Any]:
    """The proxy's refusals of the task's model calls, from the audit log."""
    from corral.compute import Sandbox
    from corral.security.audit import AuditLog

    ours = {s.id for s in Sandbox.list(metadata={"corral.run": orch.run_id,
                                                "corral.task": task},
                                       include_destroyed=True)}
    return [r for r in AuditLog.for_home(orch.home).records()
            if r.event == "llm.limit_refused" and r.sandbox in ours]


def _agent_output(orch: Orchestrator, task: str) -> str:
    log = orch.run_dir / "tasks" / task / "attempt-1.jsonl"
    return "\n".join(str(json.loads(line).get("text", "")) for line in
                     log.read_text().splitlines() if line.strip())


def test_command_harness_is_charged_from_the_proxy_and_stopped_at_its_budget(fenced):
    """Two calls of 600 tokens spend the attempt's 1200 exactly: the proxy refuses the
    third; the agent carries on and exits 0; the task is budget_exceeded all the
    same, charged the 1200 the proxy metered and not the 999 the agent claimed."""
    f = fenced([{"match": {"contains": "call-"}, "turns": [_turn(100, 500)]}])
    orch = f.orchestrator([("spender", ["call-1", "call-2", "call-3"])],
                          {"attempt_tokens": 1200})
    st = finish(orch, timeout=120)
    t = task_state(st, "spender")
    assert t["state"] == "budget_exceeded", t
    assert "the attempt's token budget (budgets.attempt_tokens: 1200) is spent" in t["reason"]
    assert t["tokens"] == 1200 and st["tokens"] == 1200
    assert len(f.llm.model_requests()) == 2
    assert {c.api_key for c in f.llm.model_requests()} == {REAL_KEY}
    out = _agent_output(orch, "spender")
    assert "call-1 200" in out and "call-2 200" in out and "call-3 429" in out
    assert _refusals(orch, "spender")
    assert git(f.origin, "log", "--format=%s", "main").splitlines() == ["init"]


def test_run_budget_spent_by_one_task_shrinks_the_others_limit(fenced):
    """Two tasks at once under a 1000-token run budget. Both start with the whole
    budget as their limit; ``a`` spends 600, and ``b``'s limit, while it runs,
    drops to the 400 left. ``b`` spends them and its next call is refused."""
    from corral.security.metering import Meter

    f = fenced([{"match": {"contains": "a-1"}, "turns": [_turn(100, 500)]},
                {"match": {"contains": "b-"}, "turns": [_turn(100, 300)]}])
    orch = f.orchestrator([("a", ["wait", "a-1"]), ("b", ["wait", "b-1", "b-2"])],
                          {"run_tokens": 1000}, max_parallel=2)
    meter = Meter(orch.ctx.store)
    th, out = run_in_thread(orch)
    try:
        def limits() -> dict[str, Any] | None:
            rows = {t["id"]: t["sandbox"] for t in orch.status()["tasks"]}
            if not all(rows.values()):
                return None
            lims = {tid: meter.limit(sid) for tid, sid in rows.items()}
            if not all(lim is not None and lim.tokens is not None for lim in lims.values()):
                return None
            return {"sandboxes": rows, "limits": {k: v.tokens for k, v in lims.items()}}

        got = wait_for(limits, timeout=90, what="both turns to get their proxy limits")
        assert got["limits"] == {"a": 1000, "b": 1000}
        from corral.compute import Sandbox

        go_a = Sandbox.connect(got["sandboxes"]["a"])
        go_a.files.write("/tmp/corral-go", b"")
        sb_b = got["sandboxes"]["b"]
        wait_for(lambda: (meter.limit(sb_b).tokens or 0) == 400, timeout=30,  # type: ignore[union-attr]
                 what="b's limit to drop to what a left of the run budget")
        lim = meter.limit(sb_b)
        assert lim is not None
        assert lim.token_label == "the run's token budget (budgets.run_tokens: 1000)"
        Sandbox.connect(sb_b).files.write("/tmp/corral-go", b"")
        th.join(120)
        assert not th.is_alive(), orch.status()
    finally:
        if th.is_alive():
            orch.stop()
            th.join(30)
    st = out["status"]
    assert task_state(st, "a")["state"] == "merged"
    b = task_state(st, "b")
    assert b["state"] == "budget_exceeded", b
    assert "the run's token budget (budgets.run_tokens: 1000) is spent" in b["reason"]
    assert (task_state(st, "a")["tokens"], b["tokens"], st["tokens"]) == (600, 400, 1000)
    assert "b-2 429" in _agent_output(orch, "b")
    assert len(f.llm.model_requests()) == 2  # a-1 and b-1; b-2 never reached the model
