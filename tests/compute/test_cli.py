"""The `corral sandbox` commands, run as a user would (real processes, real sandboxes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def test_full_cli_tour(corral_cli, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.txt").write_text("from host\n")
    r = corral_cli("sandbox", "create", "--workspace", str(ws), "--memory", "256M",
                   "--meta", "task=T-12", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    sid = info["id"]
    assert info["state"] == "running" and info["metadata"] == {"task": "T-12"}
    try:
        r = corral_cli("sandbox", "exec", sid, "--", "sh", "-c",
                       "cat hello.txt; echo e >&2; exit 5")
        assert (r.returncode, r.stdout, r.stderr) == (5, "from host\n", "e\n")
        r = corral_cli("sandbox", "exec", sid, "--env", "X=1", "--cwd", "/tmp", "--",
                       "echo $X $PWD")
        assert r.stdout == "1 /tmp\n"
        r = corral_cli("sandbox", "exec", sid, "--json", "--", "true")
        assert json.loads(r.stdout)["exit_code"] == 0
        r = corral_cli("sandbox", "ls", "--meta", "task=T-12", "--json")
        assert [s["id"] for s in json.loads(r.stdout)] == [sid]
        r = corral_cli("sandbox", "snapshot", sid, "--name", "clean", "--json")
        snap = json.loads(r.stdout)["id"]
        corral_cli("sandbox", "exec", sid, "--", "rm hello.txt")
        assert corral_cli("sandbox", "restore", sid, "clean").returncode == 0
        assert corral_cli("sandbox", "exec", sid, "--", "cat", "hello.txt").stdout == "from host\n"
        r = corral_cli("sandbox", "snapshots", sid, "--json")
        assert [s["id"] for s in json.loads(r.stdout)] == [snap]
        # cp in both directions
        (tmp_path / "up.txt").write_text("up")
        assert corral_cli("sandbox", "cp", str(tmp_path / "up.txt"), f"{sid}:/workspace/up.txt"
                          ).returncode == 0
        assert corral_cli("sandbox", "cp", f"{sid}:/workspace", str(tmp_path / "down")
                          ).returncode == 0
        assert sorted(p.name for p in (tmp_path / "down").iterdir()) == ["hello.txt", "up.txt"]
        for op in ("pause", "unpause", "stop", "resume"):
            r = corral_cli("sandbox", op, sid, "--json")
            assert r.returncode == 0, (op, r.stderr)
        r = corral_cli("sandbox", "fork", snap, "--count", "2", "--json")
        ids = json.loads(r.stdout)["ids"]
        assert len(ids) == 2
        for fid in ids:
            assert corral_cli("sandbox", "destroy", fid).returncode == 0
    finally:
        corral_cli("sandbox", "destroy", sid)
    # the workspace directory was only read
    assert sorted(p.name for p in ws.iterdir()) == ["hello.txt"]


def test_errors_are_one_line_with_usage_exit_codes(corral_cli, tmp_path: Path) -> None:
    cases = [
        (("sandbox", "exec", "sb-unknown", "--", "true"), 2, "sb-unknown"),
        (("sandbox", "create", "--workspace", str(tmp_path / "missing")), 2, "does not exist"),
        (("sandbox", "create", "--memory", "lots"), 2, "not a size"),
        (("sandbox", "create", "--meta", "novalue"), 2, "KEY=VALUE"),
        (("sandbox", "restore", "sb-unknown", "x"), 2, "sb-unknown"),
        (("sandbox", "fork", "snap-unknown"), 2, "snap-unknown"),
        (("sandbox", "frobnicate"), 2, "frobnicate"),
    ]
    for args, code, text in cases:
        r = corral_cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_illegal_transition_exit_code(corral_cli, sandbox) -> None:
    r = corral_cli("sandbox", "unpause", sandbox.id)
    assert r.returncode == 2 and "running" in r.stderr


def test_shell_is_an_interactive_terminal(sandbox) -> None:
    import select

    exe = str(Path(sys.executable).parent / "corral")
    master, slave = os.openpty()
    proc = subprocess.Popen([exe, "sandbox", "shell", sandbox.id], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)

    def read_until(marker: bytes, timeout: float = 20) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
        return buf

    try:
        assert b"$ " in read_until(b"$ ")  # the prompt of an interactive bash
        os.write(master, b"tty; stty size; echo marker-$((6*7)); exit 3\n")
        out = read_until(b"marker-42")
        assert b"marker-42" in out and b"/dev/pts/" in out
        assert proc.wait(10) == 3
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sandbox_outlives_its_creator(corral_cli) -> None:
    code = ("from corral import Sandbox; s = Sandbox.create(); "
            "s.commands.run('echo made-elsewhere > /workspace/x'); print(s.id)")
    sid = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    from corral import Sandbox

    sbx = Sandbox.connect(sid)
    assert sbx.state.value == "running"
    assert sbx.commands.run("cat x").stdout == "made-elsewhere\n"
    r = corral_cli("sandbox", "destroy", sid)
    assert r.returncode == 0
