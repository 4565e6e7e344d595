"""Real dev environments: prebuild caching and sandbox/host parity."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from corral import ConfigError, Sandbox, SandboxError
from corral.compute import environment
from corral.config import load_repo_config


def test_build_is_cached_by_config_and_lock_files(sample_repo: Path) -> None:
    first = environment.build(sample_repo, name="calc-cache")
    assert not first.cached and first.steps[0]["exit_code"] == 0
    again = environment.build(sample_repo, name="calc-cache")
    assert again.cached and again.snapshot_id == first.snapshot_id
    # an unrelated source edit does not rebuild; a lock file does
    (sample_repo / "calc" / "__init__.py").write_text("# edited\n")
    assert environment.build(sample_repo, name="calc-cache").cached
    (sample_repo / "requirements.txt").write_text("six==1.16.0\n")
    rebuilt = environment.build(sample_repo, name="calc-cache")
    assert not rebuilt.cached and rebuilt.snapshot_id != first.snapshot_id
    # sandboxes of the environment fork from the prebuild: setup already ran
    sbx = Sandbox.create(env="calc-cache")
    try:
        assert sbx.commands.run("cat .setup-done").stdout == "setup ok\n"
        assert sbx.commands.run("echo $PYTHONDONTWRITEBYTECODE").stdout == "1\n"
    finally:
        sbx.destroy()
    names = [e["name"] for e in environment.list_environments()]
    assert "calc-cache" in names


def test_failing_setup_names_the_step(sample_repo: Path) -> None:
    cfg = sample_repo / "corral.yaml"
    cfg.write_text(cfg.read_text().replace(
        "setup:\n", "setup:\n    - \"echo about to fail; exit 4\"\n"))
    before = {s.id for s in Sandbox.list()}
    with pytest.raises(SandboxError, match=r"setup step 1 .*exit 4.*about to fail"):
        environment.build(sample_repo, name="calc-broken")
    assert {s.id for s in Sandbox.list()} == before  # the build sandbox is gone


def test_check_agrees_when_the_host_is_set_up(sample_repo: Path) -> None:
    # an engineer's checkout has had its setup run: do the same on the host copy
    subprocess.run(["bash", "-c", load_repo_config(sample_repo).environment.setup[0]],
                   cwd=sample_repo, check=True)
    res = environment.check(sample_repo, name="calc-check")
    assert res.agree, res.to_json()
    assert res.sandbox.counts == res.host.counts == {
        "passed": 3, "failed": 0, "errors": 0, "skipped": 0}


def test_check_reports_disagreement(sample_repo: Path) -> None:
    # setup never ran on the host: the host fails where the sandbox passes
    res = environment.check(sample_repo, name="calc-check2")
    assert not res.agree
    assert res.sandbox.passed and not res.host.passed
    assert res.host.counts == {"passed": 2, "failed": 0, "errors": 1, "skipped": 0}


def test_check_cli_exit_codes(sample_repo: Path, corral_cli) -> None:
    out = corral_cli("env", "check", str(sample_repo), "--json")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["agree"] is False


def test_bad_config_names_file_line_and_key(sample_repo: Path, corral_cli) -> None:
    (sample_repo / "corral.yaml").write_text(
        "environment:\n  setup: ['true']\n  limits:\n    memory: lots\n")
    with pytest.raises(ConfigError, match=r"corral.yaml:4: environment.limits.memory: .*size"):
        load_repo_config(sample_repo)
    (sample_repo / "corral.yaml").write_text("environment:\n  setpu: []\n")
    with pytest.raises(ConfigError, match=r"corral.yaml:2: environment.setpu: unknown key"):
        load_repo_config(sample_repo)
    (sample_repo / "corral.yaml").write_text("environment: [\n")
    with pytest.raises(ConfigError, match=r"corral.yaml:\d+: invalid YAML"):
        load_repo_config(sample_repo)
    r = corral_cli("env", "build", str(sample_repo))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid YAML" in r.stderr


def test_devcontainer_subset(tmp_path: Path) -> None:
    dc = tmp_path / ".devcontainer"
    dc.mkdir()
    (dc / "devcontainer.json").write_text("""{
      // comments and trailing commas are allowed
      "name": "x",
      "image": "mcr.microsoft.com/devcontainers/python:3.11",
      "onCreateCommand": "echo one",
      "postCreateCommand": ["pip", "install", "-e", "."],
      "containerEnv": {"A": "1",},
      "remoteEnv": {"B": "${localEnv:HOME}"},
      "remoteUser": "vscode",
    }""")
    cfg = load_repo_config(tmp_path)
    assert cfg.environment.setup == ["echo one", "pip install -e ."]
    assert cfg.environment.env["A"] == "1" and cfg.environment.env["B"].startswith("/")
    assert cfg.environment.user == "agent"
    from corral.devcontainer import unsupported

    assert unsupported(dc / "devcontainer.json") == ["image"]
