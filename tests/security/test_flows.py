"""Whole flows through the fence with real clients: live approvals, git pushes
decided per ref, pip against a loopback index, model API metering and limits."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fence_servers import run

from corral.security.approvals import ApprovalQueue
from corral.security.metering import Meter


def _home() -> Path:
    from corral.compute.context import get_context

    return get_context().home


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _pending(sandbox_id: str, timeout: float = 20.0) -> dict[str, Any]:
    queue = ApprovalQueue.for_home()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = queue.list(sandbox_id=sandbox_id)
        if items:
            return items[0]
        time.sleep(0.05)
    raise AssertionError("no approval became pending")


ASK = """
- {host: api.example.test, decision: allow}
- {host: api.example.test, methods: [DELETE], decision: ask, reason: "deleting needs a human"}
"""


def test_ask_holds_the_live_request_until_approved(write_policy, fenced, tls_upstream):
    sbx = fenced(write_policy(ASK, extra="approvals: {timeout: 60s}"))
    t, out = _in_thread(lambda: run(sbx, "curl -sS -X DELETE -w '\\n%{http_code}' "
                                         "https://api.example.test/items/1"))
    ap = _pending(sbx.id)
    assert ap["summary"] == "DELETE https://api.example.test/items/1"
    assert ap["reason"] == "deleting needs a human"
    time.sleep(0.3)
    assert t.is_alive() and not tls_upstream.seen("/items/1")  # the client just waits
    ApprovalQueue.for_home().approve(ap["id"], actor="user:test")
    t.join(30)
    assert out and out[0].stdout.endswith("200"), out
    assert tls_upstream.seen("/items/1")[-1].method == "DELETE"


def test_ask_denied_or_timed_out_is_a_403_with_the_reason(write_policy, fenced, tls_upstream):
    path = write_policy(ASK, extra="approvals: {timeout: 60s}")
    sbx = fenced(path)
    t, out = _in_thread(lambda: run(sbx, "curl -sS -X DELETE -w '\\n%{http_code}' "
                                         "https://api.example.test/items/2"))
    ap = _pending(sbx.id)
    ApprovalQueue.for_home().deny(ap["id"], reason="not on a Friday", actor="user:test")
    t.join(30)
    assert out[0].stdout.endswith("403")
    assert "not on a Friday" in out[0].stdout
    write_policy(ASK, extra="approvals: {timeout: 1s}", path=path)
    time.sleep(1.0)
    r = run(sbx, "curl -sS -X DELETE -w '\\n%{http_code}' https://api.example.test/items/3")
    assert r.stdout.endswith("403") and "nobody approved" in r.stdout
    assert not tls_upstream.seen("/items/2") and not tls_upstream.seen("/items/3")


def test_a_held_request_whose_client_gives_up_is_withdrawn(write_policy, fenced):
    sbx = fenced(write_policy(ASK, extra="approvals: {timeout: 60s}"))
    t, _out = _in_thread(lambda: run(sbx, "timeout 2 curl -sS -X DELETE "
                                         "https://api.example.test/items/4"))
    ap = _pending(sbx.id)
    t.join(30)
    queue = ApprovalQueue.for_home()
    deadline = time.monotonic() + 10
    while queue.status(ap["id"]) == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue.get(ap["id"]).status == "denied"
    assert queue.get(ap["id"]).actor == "proxy"


# -- git --------------------------------------------------------------------------------

GIT_ENV = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@example.invalid",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@example.invalid",
           "GIT_TERMINAL_PROMPT": "0"}


@pytest.fixture
def bare_repo(tls_upstream) -> Path:
    root = tls_upstream.git_root
    assert root is not None
    repo = root / f"app-{time.monotonic_ns()}.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "http.receivepack", "true"], check=True)
    return repo


def _refs(repo: Path) -> dict[str, str]:
    r = subprocess.run(["git", "-C", str(repo), "for-each-ref", "--format=%(refname) "
                        "%(objectname)"], capture_output=True, text=True, check=True)
    return dict(line.split() for line in r.stdout.splitlines())


def test_git_push_is_decided_per_ref(write_policy, fenced, bare_repo):
    path = write_policy("""
        - {host: git.example.test, decision: allow}
        - host: git.example.test
          git: {push: {"refs/heads/main": ask, "refs/heads/*": allow}, delete: deny}
    """, extra="approvals: {timeout: 60s}")
    sbx = fenced(path)
    url = f"https://git.example.test/git/{bare_repo.name}"
    r = run(sbx, f"cd /tmp && git clone -q {url} app && cd app && echo one > a.txt && "
                 "git add a.txt && git commit -qm one && git push -q origin HEAD:refs/heads/feat",
            env=GIT_ENV)
    assert r.exit_code == 0, r.stderr
    assert "refs/heads/feat" in _refs(bare_repo)
    # main is held for a human: the push waits, then lands once approved
    t, out = _in_thread(lambda: run(sbx, "cd /tmp/app && git push -q origin HEAD:main",
                                    env=GIT_ENV))
    ap = _pending(sbx.id)
    assert "refs/heads/main" in ap["summary"]
    assert "refs/heads/main" not in _refs(bare_repo)
    ApprovalQueue.for_home().approve(ap["id"], actor="user:test")
    t.join(60)
    assert out and out[0].exit_code == 0, out
    assert "refs/heads/main" in _refs(bare_repo)
    # deleting a branch is denied, and git shows the reason
    r = run(sbx, "cd /tmp/app && git push origin :refs/heads/feat", env=GIT_ENV)
    assert r.exit_code != 0
    assert "403" in r.stderr or "denied" in r.stderr.lower()
    assert "refs/heads/feat" in _refs(bare_repo)


# -- pip ----------------------------------------------------------------------------------


def test_pip_download_and_install_through_the_proxy(write_policy, fenced, tls_upstream):
    sbx = fenced(write_policy("- {host: pypi.example.test, methods: [GET], decision: allow}"))
    index = "--index-url https://pypi.example.test/simple/ --disable-pip-version-check"
    r = run(sbx, f"python3 -m pip download -q {index} -d /tmp/dl tinypkg && ls /tmp/dl",
            timeout=120)
    assert r.exit_code == 0, r.stderr
    assert "tinypkg-1.0-py3-none-any.whl" in r.stdout
    r = run(sbx, f"python3 -m pip install -q {index} --target /tmp/site tinypkg && "
                 "PYTHONPATH=/tmp/site python3 -c 'import tinypkg; print(tinypkg.VALUE)'",
            timeout=120)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "42"
    assert tls_upstream.seen("/files/tinypkg-1.0")


# -- model API metering -------------------------------------------------------------------


@pytest.fixture
def fake_llm(upstream_ca):
    from corral.testing.fakellm import FakeLLM

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert("llm.example.test").configure_cert(ctx)
    with FakeLLM(ssl_context=ctx) as llm:
        yield llm


def test_model_calls_are_metered_and_limited(write_policy, fenced, fake_llm):
    path = write_policy(
        "- {host: llm.example.test, decision: allow}",
        extra="llm:\n  hosts: {llm.example.test: anthropic}\n  token_limit: 1\n",
        resolve={"llm.example.test:443": f"127.0.0.1:{fake_llm.port}"})
    sbx = fenced(path)
    body = json.dumps({"model": "claude-test", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]})
    cmd = ("curl -sS -w '\\n%{http_code}' -H 'content-type: application/json' "
           "-H 'x-api-key: sk-test' -H 'anthropic-version: 2023-06-01' "
           f"--data-binary '{body}' https://llm.example.test/v1/messages")
    r = run(sbx, cmd)
    assert r.stdout.endswith("200"), r.stdout + r.stderr
    from corral.compute.context import get_context

    meter = Meter(get_context().store)
    deadline = time.monotonic() + 5
    while meter.totals(sandbox_id=sbx.id).requests == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    totals = meter.totals(sandbox_id=sbx.id)
    assert totals.requests == 1 and totals.tokens > 0
    # over the limit: a clear 429 in the provider's error shape, the model is not called
    calls = len(fake_llm.requests)
    r = run(sbx, cmd)
    assert r.stdout.endswith("429")
    assert "token" in json.loads(r.stdout.rsplit("\n", 1)[0])["error"]["message"]
    assert len(fake_llm.requests) == calls
