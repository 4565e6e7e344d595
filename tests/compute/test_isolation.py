"""What a sandbox can and cannot see or do, checked from inside real sandboxes."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from corral import Limits, Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the local provider needs root")


def test_host_secrets_are_not_visible(sandbox: Sandbox, tmp_path: Path) -> None:
    marker = f"corral-secret-{secrets.token_hex(4)}"
    planted = Path("/root") / marker
    planted.write_text("top secret")
    try:
        r = sandbox.commands.run(
            f"cat /root/{marker}; ls -a /root /home; ls {Path(__file__).parent}; "
            f"ls {sandbox._ctx.home}; ls /var/lib/corral; ls /run; ls /tmp", user="root")
        assert "top secret" not in r.stdout
        assert marker not in r.stdout + r.stderr.replace(f"/root/{marker}", "")
        # the project tree and corral's own state dir do not exist inside
        assert "test_isolation.py" not in r.stdout
        assert "corral.db" not in r.stdout
        home_entries = sandbox.commands.run("ls /home").stdout.split()
        assert home_entries == ["agent"]
    finally:
        planted.unlink()


def test_writes_never_reach_the_host(sandbox: Sandbox) -> None:
    name = f"corral-escape-{secrets.token_hex(4)}"
    r = sandbox.commands.run(
        f"echo x > /tmp/{name}; echo x > /home/agent/{name}; echo x > /workspace/{name}; "
        f"echo x > /etc/{name} 2>/dev/null; echo x > /usr/{name} 2>/dev/null; true")
    assert r.exit_code == 0
    for d in ("/tmp", "/etc", "/usr", "/home/agent", "/workspace"):
        assert not (Path(d) / name).exists()
    # the sandbox keeps its own writes
    assert sandbox.files.read(f"/tmp/{name}") == b"x\n"
    assert not sandbox.files.exists(f"/etc/{name}")


def test_unprivileged_no_capabilities_no_new_privs(sandbox: Sandbox) -> None:
    status = sandbox.commands.run("cat /proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == str(sandbox._ctx.settings.sandbox_uid)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, cap
    assert fields["NoNewPrivs"].strip() == "1"
    # setuid binaries do not elevate (no_new_privs and a nosuid root)
    assert sandbox.commands.run("su -c id root </dev/null").exit_code != 0


def test_root_inside_is_not_host_root(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("id -u; cat /proc/self/uid_map; touch /usr/bin/x", user="root")
    lines = r.stdout.split("\n")
    assert lines[0] == "0"
    inside, outside, count = lines[1].split()
    assert (inside, outside, count) == ("0", str(sandbox._ctx.settings.sandbox_uid), "1")
    assert r.exit_code != 0  # host-owned system files stay read-only


def test_own_pid_namespace_and_proc(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("ps -eo pid=,args=")
    pids = [int(line.split()[0]) for line in r.stdout.splitlines()]
    assert min(pids) == 1 and max(pids) < 50
    assert "pytest" not in r.stdout
    assert not sandbox.files.exists(f"/proc/{os.getpid()}/environ") or os.getpid() < 50


def test_other_sandboxes_are_invisible(sandbox: Sandbox) -> None:
    other = Sandbox.create()
    try:
        other.commands.run("echo mine > /workspace/only-here; sleep 30", background=True)
        time.sleep(0.2)
        assert not sandbox.files.exists("/workspace/only-here")
        assert "sleep 30" not in sandbox.commands.run("ps -eo args=").stdout
        r = sandbox.commands.run(f"ls {other._ctx.home}/sandboxes 2>&1; true")
        assert other.id not in r.stdout
    finally:
        other.destroy()


def test_network_is_loopback_only(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("ip -o addr | awk '{print $2}' | sort -u")
    assert r.stdout.split() == ["lo"]
    # no route: the connect fails at once, nothing leaves (192.0.2.1 is TEST-NET-1)
    r = sandbox.commands.run(
        "python3 -c \"import socket; socket.create_connection(('192.0.2.1', 80), timeout=2)\"")
    assert r.exit_code != 0 and "unreachable" in r.stderr.lower()


def test_memory_limit_is_enforced() -> None:
    sbx = Sandbox.create(limits=Limits.parse(memory="64M"))
    try:
        r = sbx.commands.run("python3 -c \"b = bytearray(300 * 1024 * 1024); print('allocated')\"")
        assert r.exit_code != 0 and "allocated" not in r.stdout
        # the sandbox itself survives its OOM
        assert sbx.commands.run("echo alive").stdout == "alive\n"
    finally:
        sbx.destroy()


def test_pids_limit_is_enforced() -> None:
    sbx = Sandbox.create(limits=Limits.parse(pids=40))
    try:
        r = sbx.commands.run("for i in $(seq 80); do sleep 5 & done 2>&1; wait", timeout=20)
        assert "Resource temporarily unavailable" in r.stdout + r.stderr
    finally:
        sbx.destroy()


def test_cpu_limit_is_enforced() -> None:
    sbx = Sandbox.create(limits=Limits.parse(cpus=0.25))
    try:
        r = sbx.commands.run(
            "python3 -c \"import time; t=time.monotonic()\nwhile time.monotonic()-t < 1.0: pass\n"
            "print(time.process_time())\"")
        assert float(r.stdout) < 0.45  # a quarter core, with slack for accounting
    finally:
        sbx.destroy()


def test_pause_really_stops_processes(sandbox: Sandbox) -> None:
    sandbox.commands.run("i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.01; done",
                         background=True)
    time.sleep(0.3)
    sandbox.pause()
    try:
        before = sandbox.files.read("/tmp/count")
        time.sleep(0.4)
        assert sandbox.files.read("/tmp/count") == before
    finally:
        sandbox.unpause()
    time.sleep(0.3)
    assert int(sandbox.files.read("/tmp/count")) > int(before)


def test_stop_ends_every_process_and_keeps_files(sandbox: Sandbox) -> None:
    sandbox.commands.run("echo kept > /workspace/f; sleep 60", background=True)
    time.sleep(0.1)
    pids = sandbox.info()["stats"]["pids"]
    assert pids >= 3
    sandbox.stop()
    assert "stats" not in sandbox.info()
    assert sandbox.files.read("/workspace/f") == b"kept\n"
    sandbox.resume()
    assert sandbox.commands.run("cat /workspace/f; ps -eo args=").stdout.count("sleep 60") == 0


def test_private_workspace_dir_and_locked_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "private"
    ws.mkdir(mode=0o700)
    (ws / "f").write_text("x")
    sbx = Sandbox.create(workspace=ws)
    try:
        assert sbx.commands.run("cat f").stdout == "x"
        # the agent locks its own workspace; resume still works and commands still run there
        sbx.commands.run("chmod 700 /workspace")
        sbx.stop()
        sbx.resume()
        assert sbx.commands.run("pwd; cat f").stdout == "/workspace\nx"
    finally:
        sbx.destroy()
