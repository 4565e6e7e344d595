"""Real dev environments: prebuilds (``corral env build``) and parity checks
(``corral env check``).

A prebuild is the repo's setup commands run once in a sandbox seeded with the
repo, then sealed as a snapshot; every later sandbox of that environment forks
from it. It is keyed by a hash of the environment config and the repo's lock
files, and rebuilt only when that key changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from corral.compute.context import Context, get_context
from corral.compute.sandbox import Sandbox
from corral.compute.types import Limits
from corral.config import RepoConfig, load_repo_config
from corral.errors import ConfigError, CorralError, NotFound, SandboxError, UsageError
from corral.store.models import EnvironmentRow, SnapshotRow, utcnow

#: files whose content keys a prebuild, wherever they exist in the repo root
LOCK_FILES = (
    "corral.yaml", ".devcontainer/devcontainer.json", ".devcontainer.json",
    "requirements.txt", "requirements-dev.txt", "requirements-test.txt", "constraints.txt",
    "pyproject.toml", "setup.py", "setup.cfg", "poetry.lock", "uv.lock", "Pipfile.lock",
    "package.json", "package-lock.json", "yarn.lock", "pnpm-lock.yaml",
    "Cargo.toml", "Cargo.lock", "go.mod", "go.sum", "Gemfile.lock", "composer.lock",
)

Progress = Callable[[str], None]


def env_name(repo: Path) -> str:
    """The default environment name of a repo: its directory name, sanitized."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", repo.resolve().name).strip("-.") or "repo"
    return name[:100]


def prebuild_key(repo: Path, cfg: RepoConfig) -> str:
    """Hash of the environment config and the lock files' contents."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.environment.model_dump(mode="json"), sort_keys=True).encode())
    for rel in sorted({*LOCK_FILES, *cfg.environment.lock_files}):
        p = repo / rel
        if p.is_file():
            h.update(f"\0{rel}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def prebuild_for(ctx: Context, name: str) -> SnapshotRow:
    """The prebuild snapshot of environment ``name``; raises ``NotFound``."""
    with ctx.store.session() as s:
        env = s.get(EnvironmentRow, name)
        snap = s.get(SnapshotRow, env.snapshot_id) if env else None
    if env is None:
        raise NotFound(f"no environment named {name!r}; build it with `corral env build`")
    if snap is None:
        raise NotFound(f"environment {name!r} lost its prebuild; run `corral env build --force`")
    return snap


@dataclass
class BuildResult:
    name: str
    key: str
    snapshot_id: str
    cached: bool
    seconds: float
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key[:16], "snapshot": self.snapshot_id,
                "cached": self.cached, "seconds": round(self.seconds, 3), "steps": self.steps}


def build(
    repo: Path,
    *,
    name: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    output: Callable[[bytes], None] | None = None,
    home: str | Path | None = None,
) -> BuildResult:
    """Build (or reuse) the prebuild of ``repo``. Raises ``ConfigError`` for a bad
    config and ``SandboxError`` naming the setup step that failed."""
    repo = _check_repo(repo)
    ctx = get_context(home)
    cfg = load_repo_config(repo)
    name = name or env_name(repo)
    key = prebuild_key(repo, cfg)
    say = progress or (lambda _msg: None)
    with ctx.lock(f"env-{name}"):
        # a build sandbox of this environment while we hold its lock: its build died
        for stale in Sandbox.list(metadata={"corral.role": "prebuild", "corral.env": name},
                                  home=ctx.home):
            with contextlib.suppress(CorralError):
                stale.destroy()
        with ctx.store.session() as s:
            existing = s.get(EnvironmentRow, name)
            snap_ok = existing is not None and s.get(SnapshotRow, existing.snapshot_id) is not None
        if existing is not None and existing.key == key and snap_ok and not force:
            say(f"environment {name} is up to date (prebuild {existing.snapshot_id})")
            return BuildResult(name, key, existing.snapshot_id, True, 0.0)
        t0 = time.monotonic()
        ec = cfg.environment
        say(f"creating the build sandbox from {repo}")
        sbx = Sandbox.create(
            workspace=repo, user=ec.user, env_vars=ec.env, expose=ec.expose, base=ec.base,
            limits=Limits.parse(ec.limits.cpus, ec.limits.memory, ec.limits.pids),
            metadata={"corral.role": "prebuild", "corral.env": name}, home=ctx.home,
        )
        steps: list[dict[str, Any]] = []
        try:
            for i, cmd in enumerate(ec.setup, 1):
                say(f"setup {i}/{len(ec.setup)}: {cmd}")
                r = sbx.commands.run(cmd, timeout=ec.setup_timeout, on_stdout=output,
                                     on_stderr=output)
                steps.append({"command": cmd, "exit_code": r.exit_code,
                              "seconds": round(r.duration, 3)})
                if r.exit_code != 0:
                    tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
                    why = "timed out" if r.timed_out else f"exit {r.exit_code}"
                    raise SandboxError(
                        f"setup step {i} ({cmd!r}) failed ({why}): " + " | ".join(tail))
            say("sealing the prebuild")
            sbx.stop()
            snap = sbx.snapshot(f"prebuild-{name}")
        finally:
            with contextlib.suppress(Exception):
                sbx.destroy()
        seconds = time.monotonic() - t0
        with ctx.store.session() as s:
            s.execute(update(SnapshotRow).where(SnapshotRow.id == snap.id).values(
                kind="prebuild", env=name))
            row = s.get(EnvironmentRow, name)
            old = row.snapshot_id if row is not None else None
            if row is None:
                s.add(EnvironmentRow(name=name, key=key, snapshot_id=snap.id, repo=str(repo),
                                     config=cfg.environment.model_dump(mode="json"),
                                     built_at=utcnow(), build_seconds=int(seconds)))
            else:
                row.key, row.snapshot_id, row.repo = key, snap.id, str(repo)
                row.config = cfg.environment.model_dump(mode="json")
                row.built_at, row.build_seconds = utcnow(), int(seconds)
        if old and old != snap.id:
            with contextlib.suppress(Exception):  # still used by running sandboxes: keep it
                Sandbox.delete_snapshot(old, home=ctx.home)
        say(f"environment {name} built in {seconds:.1f}s (prebuild {snap.id})")
        return BuildResult(name, key, snap.id, False, seconds, steps)


def list_environments(home: str | Path | None = None) -> list[dict[str, Any]]:
    ctx = get_context(home)
    with ctx.store.session() as s:
        rows = list(s.scalars(select(EnvironmentRow).order_by(EnvironmentRow.name)))
    return [{"name": r.name, "key": r.key[:16], "snapshot": r.snapshot_id, "repo": r.repo,
             "built_at": r.built_at.isoformat(), "build_seconds": r.build_seconds}
            for r in rows]


# -- env check --------------------------------------------------------------------
_PYTEST = re.compile(r"(\d+) (passed|failed|error|errors|skipped|xfailed|xpassed)")
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in", re.MULTILINE)
_UNITTEST_END = re.compile(r"^(OK|FAILED)(?: \((.*)\))?\s*$", re.MULTILINE)


def test_counts(output: str) -> dict[str, int] | None:
    """Pass/fail counts from pytest's or unittest's summary, if there is one."""
    tail = "\n".join(output.strip().splitlines()[-30:])
    m = _UNITTEST_RAN.search(tail)
    if m:
        ran = int(m.group(1))
        counts = {"passed": ran, "failed": 0, "errors": 0, "skipped": 0}
        end = _UNITTEST_END.search(tail)
        if end and end.group(2):
            for part in end.group(2).split(","):
                k, _, v = part.strip().partition("=")
                key = {"failures": "failed", "errors": "errors", "skipped": "skipped"}.get(k)
                if key and v.isdigit():
                    counts[key] = int(v)
        counts["passed"] = max(0, ran - counts["failed"] - counts["errors"] - counts["skipped"])
        return counts
    last = [ln for ln in tail.splitlines() if _PYTEST.search(ln)]
    if last:
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        for n, word in _PYTEST.findall(last[-1]):
            key = {"error": "errors", "xfailed": "skipped", "xpassed": "passed"}.get(word, word)
            counts[key] = counts.get(key, 0) + int(n)
        return counts
    return None


@dataclass
class RunSide:
    where: str
    exit_code: int
    seconds: float
    counts: dict[str, int] | None
    tail: list[str]

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "exit_code": self.exit_code, "passed": self.passed,
                "seconds": round(self.seconds, 3), "counts": self.counts, "tail": self.tail}


@dataclass
class CheckResult:
    command: str
    sandbox: RunSide
    host: RunSide

    @property
    def agree(self) -> bool:
        same = self.sandbox.passed == self.host.passed
        if self.sandbox.counts and self.host.counts:
            same = same and self.sandbox.counts == self.host.counts
        return same

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "agree": self.agree,
                "sandbox": self.sandbox.to_json(), "host": self.host.to_json()}


def check(
    repo: Path,
    *,
    name: str | None = None,
    progress: Progress | None = None,
    home: str | Path | None = None,
) -> CheckResult:
    """Run the repo's CI command in a fresh fork of the prebuild and on the host."""
    repo = _check_repo(repo)
    cfg = load_repo_config(repo)
    cmd = cfg.ci.command
    if not cmd:
        raise ConfigError(f"{repo / 'corral.yaml'}: ci.command is not set; nothing to check")
    say = progress or (lambda _msg: None)
    res = build(repo, name=name, progress=progress, home=home)
    say("running the CI command in a fresh sandbox")
    sbx = Sandbox.create(env=res.name, metadata={"corral.role": "env-check"}, home=home)
    try:
        r = sbx.commands.run(cmd, timeout=cfg.ci.timeout)
    finally:
        sbx.destroy()
    out = r.stdout + r.stderr
    inside = RunSide("sandbox", r.exit_code, r.duration, test_counts(out), _tail(out))
    say("running the CI command on the host")
    t0 = time.monotonic()
    env = {**os.environ, **cfg.environment.env}
    try:
        h = subprocess.run(["/bin/bash", "-c", cmd], cwd=repo, env=env, capture_output=True,
                           timeout=cfg.ci.timeout, check=False)
        hout = (h.stdout + h.stderr).decode(errors="replace")
        code = h.returncode
    except subprocess.TimeoutExpired as exc:
        hout = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")
        code = 124
    host = RunSide("host", code, time.monotonic() - t0, test_counts(hout), _tail(hout))
    return CheckResult(cmd, inside, host)


def _tail(text: str, n: int = 8) -> list[str]:
    return text.strip().splitlines()[-n:]


def _check_repo(repo: Path) -> Path:
    repo = repo.expanduser()
    if not repo.is_dir():
        raise UsageError(f"repository directory {repo} does not exist")
    return repo.resolve()


# -- image import -------------------------------------------------------------------
def import_image(source: Path, name: str, *, home: str | Path | None = None) -> dict[str, Any]:
    """Copy a root filesystem (directory or tarball) into the layer store as ``name``.

    Sandboxes use it with ``environment: {base: NAME}`` in place of the host root.
    """
    from corral.compute.provider import get_provider

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name in ("host", ".", ".."):
        raise UsageError(f"bad image name {name!r}: letters, digits, _ . - (not 'host')")
    ctx = get_context(home)
    prov = get_provider("local", ctx.settings)
    layers = prov.layers  # type: ignore[attr-defined]
    dest = layers.root / "images" / name
    if dest.exists():
        raise UsageError(f"image {name!r} already exists")
    tmp = dest.with_name(f".{name}.tmp")
    tmp.mkdir(parents=True)
    try:
        if source.is_dir():
            r = subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(tmp)],
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SandboxError(f"copying {source} failed: {r.stderr.strip()}")
        elif source.is_file():
            with tarfile.open(source) as tf:
                tf.extractall(tmp, filter="tar")
        else:
            raise UsageError(f"no such directory or tarball: {source}")
        tmp.rename(dest)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"name": name, "path": str(dest)}
