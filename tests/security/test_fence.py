"""A fenced sandbox end to end: real clients inside, real TLS upstreams on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fence_servers import py, run

from corral.security.audit import AuditLog
from corral.security.daemon import DaemonClient, fence_dir

RULES = """
- {host: api.example.test, methods: [GET, POST], paths: ["/ok/**"], decision: allow}
- host: api.example.test
  methods: [DELETE]
  decision: deny
  reason: "deleting is not part of this task"
"""


def _home() -> Path:
    from corral.compute.context import get_context

    return get_context().home


def test_allowed_and_denied_requests_with_curl_and_python(write_policy, fenced, tls_upstream):
    sbx = fenced(write_policy(RULES))
    r = run(sbx, "curl -sS -f https://api.example.test/ok/hello?x=1")
    assert r.exit_code == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["target"] == "/ok/hello?x=1"
    assert echo["headers"]["host"] == "api.example.test"
    assert "proxy-connection" not in echo["headers"]

    # a denial is a 403 whose body is the rule's reason, for the agent to read
    r = run(sbx, "curl -sS -X DELETE -w '\\n%{http_code}' https://api.example.test/ok/x")
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "403"
    assert body.strip() == "deleting is not part of this task"
    assert not tls_upstream.seen("/ok/x")

    # no rule: the default denies, and the reason says so
    r = run(sbx, "curl -sS -w '\\n%{http_code}' https://api.example.test/elsewhere")
    assert r.stdout.endswith("403")
    assert "no rule of the corral policy allows it" in r.stdout

    # the sandbox's own python trusts the sandbox CA through the system bundle
    r = py(sbx, """
        import json, urllib.request
        print(json.load(urllib.request.urlopen("https://api.example.test/ok/py"))["target"])
    """)
    assert r.stdout.strip() == "/ok/py", r.stderr


def test_sandbox_environment_and_files(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    r = run(sbx, "env")
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[k] == "http://127.0.0.1:3128"
    assert "127.0.0.1" in env["NO_PROXY"] and "localhost" in env["no_proxy"]
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT"):
        assert env[k] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["NODE_EXTRA_CA_CERTS"].endswith(".crt")
    bundle = run(sbx, "cat /etc/ssl/certs/ca-certificates.crt").stdout
    ca_pem = (fence_dir(_home(), sbx.id) / "ca.pem").read_text()
    assert bundle.endswith(ca_pem)
    assert "PRIVATE KEY" not in bundle
    assert run(sbx, "cat /etc/resolv.conf").stdout.count("nameserver 127.0.0.1") == 1
    # the CA key is only on the host, out of the sandbox's sight
    key = (fence_dir(_home(), sbx.id) / "ca.key")
    assert key.stat().st_mode & 0o077 == 0
    r = run(sbx, "grep -rl 'PRIVATE KEY' /etc /usr/local /tmp /home /workspace 2>/dev/null; "
                 "ls /var/lib/corral 2>&1; true")
    assert "ca.key" not in r.stdout and "fence" not in r.stdout


def test_policy_edit_applies_within_a_second(write_policy, fenced):
    path = write_policy(RULES)
    sbx = fenced(path)
    assert run(sbx, "curl -sS -f -o /dev/null https://api.example.test/ok/a").exit_code == 0
    write_policy("- {host: api.example.test, decision: deny, reason: closed for now}", path=path)
    time.sleep(1.0)
    r = run(sbx, "curl -sS -w '\\n%{http_code}' https://api.example.test/ok/a")
    assert [ln for ln in r.stdout.splitlines() if ln] == ["closed for now", "403"]
    # a broken edit keeps the last good policy, and the error shows in the daemon's status
    path.write_text("network: {default: maybe}\n")
    time.sleep(1.0)
    r = run(sbx, "curl -sS -w '\\n%{http_code}' https://api.example.test/ok/a")
    assert [ln for ln in r.stdout.splitlines() if ln] == ["closed for now", "403"]
    status = DaemonClient(_home()).status()["sandboxes"][sbx.id]
    assert "network.default" in status["policy_error"]


def test_every_decision_is_audited(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    run(sbx, "curl -s -o /dev/null https://api.example.test/ok/audited; "
             "curl -s -o /dev/null https://api.example.test/denied-one")
    log = AuditLog.for_home(_home())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = [(r.event, r.details.get("url")) for r in log.records() if r.sandbox == sbx.id]
        if ("request.denied", "https://api.example.test/denied-one") in events:
            break
        time.sleep(0.05)
    assert ("request.allowed", "https://api.example.test/ok/audited") in events
    assert ("request.denied", "https://api.example.test/denied-one") in events
    assert log.verify().ok


def test_destroy_detaches_everything(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    home = _home()
    client = DaemonClient(home)
    assert sbx.id in client.status()["sandboxes"]
    d = fence_dir(home, sbx.id)
    assert d.is_dir()
    sbx.destroy()
    assert not d.exists()
    assert sbx.id not in client.status()["sandboxes"]


def test_bad_policy_is_a_usage_error_and_leaves_nothing(tmp_path):
    import pytest

    from corral.compute import Sandbox
    from corral.errors import ConfigError
    from corral.security.fence import Fence

    bad = tmp_path / "bad.yaml"
    bad.write_text("network:\n  rules:\n    - {host: x.test}\n")
    before = {s.id for s in Sandbox.list()}
    with pytest.raises(ConfigError, match="decision"):
        Fence.from_file(bad).create_sandbox()
    assert {s.id for s in Sandbox.list()} == before


def test_secret_that_cannot_be_read_fails_cleanly(write_policy, monkeypatch):
    import pytest

    from corral.compute import Sandbox
    from corral.errors import ConfigError
    from corral.security.fence import Fence

    monkeypatch.delenv("CORRAL_TEST_MISSING", raising=False)
    path = write_policy(RULES, extra="""
        secrets:
          TOKEN: {source: "env:CORRAL_TEST_MISSING", hosts: [api.example.test]}
    """)
    before = {s.id for s in Sandbox.list()}
    with pytest.raises(ConfigError, match="CORRAL_TEST_MISSING"):
        Fence.from_file(path).create_sandbox()
    assert {s.id for s in Sandbox.list()} == before


def test_fence_from_a_policy_object(write_policy):
    from corral.security.fence import Fence
    from corral.security.policy import load_policy

    policy = load_policy(write_policy(RULES))
    sbx = Fence(policy).create_sandbox(metadata={"corral.task": "T-7"})
    try:
        r = run(sbx, "curl -sS -o /dev/null -w '%{http_code}' https://api.example.test/ok/obj")
        assert r.stdout == "200"
        status = DaemonClient(_home()).status()["sandboxes"][sbx.id]
        assert status["task"] == "T-7"
        assert Path(status["policy"]).parent == fence_dir(_home(), sbx.id)
    finally:
        sbx.destroy()


def test_cli_sandbox_create_with_policy_and_proxy_status(write_policy, corral_cli):
    path = write_policy(RULES)
    r = corral_cli("sandbox", "create", "--policy", str(path), "--json")
    assert r.returncode == 0, r.stderr
    sid = json.loads(r.stdout)["id"]
    try:
        r = corral_cli("sandbox", "exec", sid, "--", "curl -sS https://api.example.test/ok/cli")
        assert r.returncode == 0 and json.loads(r.stdout)["target"] == "/ok/cli", r.stderr
        r = corral_cli("proxy", "status", "--json")
        assert sid in json.loads(r.stdout)["sandboxes"]
    finally:
        assert corral_cli("sandbox", "destroy", sid).returncode == 0
    # the destroying process never loaded the fence: the daemon notices by itself
    deadline = time.monotonic() + 5
    while fence_dir(_home(), sid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fence_dir(_home(), sid).exists()
    assert sid not in DaemonClient(_home()).status()["sandboxes"]
    r = corral_cli("sandbox", "create", "--policy", str(path.parent / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr


def test_a_fork_of_a_fenced_snapshot_gets_its_own_fence(write_policy, fenced, tls_upstream):
    """The stuck ladder's fresh session forks a snapshot: the fork must be fenced too,
    with its own CA and sentinels, never a copy of the first fence's."""
    from corral.compute import Sandbox
    from corral.security.fence import Fence

    policy = write_policy(RULES)
    first = fenced(policy)
    run(first, "echo kept > /workspace/work")
    snap = first.snapshot()
    fork = Fence.from_file(policy).fork_sandbox(snap.id, metadata={"role": "fresh"})
    try:
        assert run(fork, "cat /workspace/work").stdout == "kept\n"
        r = run(fork, "curl -sS -f https://api.example.test/ok/forked")
        assert r.exit_code == 0 and json.loads(r.stdout)["target"] == "/ok/forked", r.stderr
        ca_first = (fence_dir(_home(), first.id) / "ca.pem").read_text()
        ca_fork = (fence_dir(_home(), fork.id) / "ca.pem").read_text()
        assert ca_first != ca_fork
        assert run(fork, "cat /etc/ssl/certs/ca-certificates.crt").stdout.endswith(ca_fork)
        status = DaemonClient(_home()).request("status")
        assert fork.id in json.dumps(status)
    finally:
        fork.destroy()
    assert Sandbox.list(metadata={"role": "fresh"}) == []
