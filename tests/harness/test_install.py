"""The installer (pinned versions, a cache reused between runs), the doctor rows,
and the ``corral agents`` commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from corral.doctor import run_checks
from corral.errors import UsageError
from corral.harness.install import (
    RECORD,
    InstallError,
    cached,
    check_agents,
    install,
    layer_commands,
    resolve,
)
from corral.harness.pins import PINS, pin_for

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def test_pins_live_in_one_place():
    assert {p.version for p in PINS.values()} == {"2.1.197", "0.171.0", "0.86.2"}
    assert pin_for("codex").spec == "@openai/codex@0.171.0"
    assert pin_for("aider").spec == "aider-chat==0.86.2"
    with pytest.raises(UsageError, match="known: aider, claude-code, codex"):
        pin_for("cursor")


def test_install_records_and_reuses_the_cache(tmp_path):
    """A real npm install into a fresh cache; the second call reuses it at once, and
    concurrent callers wait for the one install."""
    said: list[str] = []
    results = []

    def go():
        results.append(install("claude-code", root=tmp_path, progress=said.append))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results
    assert a.binary == b.binary and a.binary.is_file()
    assert sum("installing" in m for m in said) == 1  # one install for two callers
    record = json.loads((a.prefix / RECORD).read_text())
    assert record["version"] == "2.1.197" and record["size_bytes"] > 100e6
    assert record["seconds"] > 0 and a.size_bytes == record["size_bytes"]
    assert subprocess.run([str(a.binary), "--version"], capture_output=True, text=True,
                          check=True).stdout.startswith("2.1.197")
    t0 = time.monotonic()
    again = install("claude-code", root=tmp_path, progress=said.append)
    assert time.monotonic() - t0 < 1 and again.prefix == a.prefix
    assert cached("claude-code", root=tmp_path) is not None
    # readable by the sandbox's unprivileged user
    assert a.prefix.stat().st_mode & 0o005 == 0o005


def test_a_failed_install_leaves_nothing(tmp_path):
    with pytest.raises(InstallError, match=re.escape("installing @openai/codex@0.0.0-nope")):
        install("codex", version="0.0.0-nope", root=tmp_path)
    assert not (tmp_path / "codex-0.0.0-nope").exists()
    assert cached("codex", version="0.0.0-nope", root=tmp_path) is None


def test_layer_and_host_modes(tmp_path, monkeypatch):
    cmds = layer_commands("aider")
    assert cmds[0] == "python3 -m venv /opt/corral-agents/aider-0.86.2"
    assert "'aider-chat==0.86.2'" in cmds[1]
    assert "npm install --prefix /opt/corral-agents/codex-0.171.0" in layer_commands("codex")[0]
    assert str(resolve("codex", "layer").binary) == \
        "/opt/corral-agents/codex-0.171.0/node_modules/.bin/codex"
    monkeypatch.setenv("PATH", str(tmp_path))
    from corral.errors import MissingTool

    with pytest.raises(MissingTool, match="codex is not on PATH"):
        resolve("codex", "host")


def test_doctor_rows(tmp_path, monkeypatch):
    # a fresh cache and an old claude on the host's PATH
    fake = tmp_path / "bin" / "claude"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '1.0.0 (Claude Code)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("CORRAL_AGENTS_CACHE", str(tmp_path / "cache"))
    rows = {r.name: r for r in check_agents(None)}
    assert not rows["claude-code"].ok and not rows["claude-code"].required
    assert "1.0.0 on the host" in rows["claude-code"].detail
    assert "tested with 2.1.197" in rows["claude-code"].detail
    assert rows["claude-code"].fix == "corral agents install claude-code (pins " \
        "@anthropic-ai/claude-code@2.1.197)"
    assert "installed on first use" in rows["codex"].detail and rows["codex"].ok
    monkeypatch.delenv("CORRAL_AGENTS_CACHE")
    install("codex")
    assert any(c.area == "agents" and c.name == "codex" and c.ok and "(pinned)" in c.detail
               for c in run_checks())


def test_agents_cli_list_and_bad_name():
    r = subprocess.run([*CORRAL, "agents", "list", "--json"], capture_output=True, text=True)
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert [a["name"] for a in data["agents"]] == ["claude-code", "codex", "aider"]
    r = subprocess.run([*CORRAL, "agents", "install", "cursor"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unknown agent CLI 'cursor'" in r.stderr


def test_fake_model_command_serves_and_logs(tmp_path):
    script = tmp_path / "model.yaml"
    script.write_text("rules:\n  - match: {contains: hello}\n    turns: [{text: Hi there}]\n")
    proc = subprocess.Popen([*CORRAL, "agents", "fake-model", "--script", str(script),
                             "--port", "0", "--record", str(tmp_path / "r.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stderr.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", first)
        assert m, first
        r = httpx.post(f"{m.group(1)}/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hello"}]})
        assert r.json()["choices"][0]["message"]["content"] == "Hi there"
        line = proc.stdout.readline()
        assert line.startswith("200 POST /v1/chat/completions [chat] rule 0 turn 0")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert json.loads((tmp_path / "r.jsonl").read_text())["api"] == "chat"
    r = subprocess.run([*CORRAL, "agents", "fake-model", "--host", "10.1.2.3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a loopback address" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{turns: [{nope: 1}]}]\n")
    r = subprocess.run([*CORRAL, "agents", "fake-model", "--script", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad.yaml:1: rules.0.turns.0.nope: unknown key" in r.stderr


@pytest.mark.parametrize("path", [Path("/var/cache/corral-agents")])
def test_default_cache_is_visible_in_host_sandboxes(path):
    """The root default sits where a ``base: host`` sandbox sees it (not masked)."""
    from corral.compute.local.rootfs import HIDDEN

    rel = str(path).lstrip("/")
    assert not any(rel == h or rel.startswith(h + "/") for h in HIDDEN)
