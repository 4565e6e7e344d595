"""Sandboxes for agents and CI, and moving git history in and out of them as data.

``SandboxFactory`` is the seam to the security layer: it makes plain sandboxes
forked from the environment's prebuild, or fenced ones through
``corral.security.fence.Fence(policy).create_sandbox(...)`` once that layer is
installed and a policy is configured.

History goes in as a bundle written with ``sbx.files`` and fetched by git
*inside* the sandbox; it comes out as a bundle the sandbox writes and the host
reads as bytes (``gitops.Repo.import_bundle`` verifies it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from corral.compute.sandbox import Sandbox
from corral.errors import ConfigError, CorralError, SandboxError
from corral.orchestrator.gitops import BundleRejected, Repo

log = logging.getLogger("corral.orchestrator")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "corral agent", "GIT_AUTHOR_EMAIL": "agent@corral.invalid",
    "GIT_COMMITTER_NAME": "corral agent", "GIT_COMMITTER_EMAIL": "agent@corral.invalid",
    "GIT_TERMINAL_PROMPT": "0",
}
IN_BUNDLE = "/tmp/corral/in.bundle"
OUT_BUNDLE = "/tmp/corral/out.bundle"
WORKDIR = "/workspace"


class SandboxFactory:
    """Makes the sandboxes of one run: forks of the prebuild, fenced when a policy is set.

    Unfenced ones come from a small pool of spares, forked in the background while
    the agents work, so that a task's sandbox (and its CI's) is ready the moment it
    is needed instead of after a fork. Spares carry the run's id in their metadata
    (``corral.role: spare``): a resumed run destroys them like any orphan.
    """

    def __init__(self, env_name: str, run_id: str, *, policy: Any = None,
                 home: str | Path | None = None, spares: int = 0) -> None:
        self.env_name = env_name
        self.run_id = run_id
        self.policy = policy
        self.home = home
        self.spares = 0 if policy else spares
        # background work yields the CPU to the tasks' own (see ``_background``)
        self._reaper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="corral-reap",
                                          initializer=_background)
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-spare",
                                          initializer=_background)
        self._pool: list[Sandbox] = []
        self._pool_lock = threading.Lock()
        self._filling = 0
        self._closed = False

    def create(self, role: str, task_id: str) -> Sandbox:
        """A fresh running sandbox for ``role`` (agent | ci) of ``task_id``."""
        spare = self._take()
        if spare is not None:
            return spare
        meta = {"corral.run": self.run_id, "corral.task": task_id, "corral.role": role}
        if self.policy:
            import importlib

            try:
                fence = importlib.import_module("corral.security.fence")
            except ImportError:
                raise ConfigError("a network policy is configured but the security layer "
                                  "(corral.security.fence) is not available") from None
            sbx: Sandbox = fence.Fence(self.policy, home=self.home).create_sandbox(
                env=self.env_name, metadata=meta, task_id=task_id)
            return sbx
        return Sandbox.create(env=self.env_name, metadata=meta, home=self.home)

    def fork(self, snapshot_id: str, role: str, task_id: str) -> Sandbox:
        """A sandbox for ``role`` of ``task_id`` from a snapshot (the stuck ladder's
        fresh session), inside the run's fence when there is a policy."""
        meta = {"corral.run": self.run_id, "corral.task": task_id, "corral.role": role}
        if self.policy:
            import importlib

            fence = importlib.import_module("corral.security.fence")
            sbx: Sandbox = fence.Fence(self.policy, home=self.home).fork_sandbox(
                snapshot_id, metadata=meta, task_id=task_id)
            return sbx
        return Sandbox.fork(snapshot_id, metadata=meta, home=self.home)[0]

    # -- spares ----------------------------------------------------------------
    def warm(self) -> None:
        """Start forking spares (after a resume has destroyed the old ones)."""
        with self._pool_lock:
            self._refill()

    def _take(self) -> Sandbox | None:
        with self._pool_lock:
            sbx = self._pool.pop(0) if self._pool else None
            self._refill()
        return sbx

    def _refill(self) -> None:  # under _pool_lock
        if self._closed:
            return
        for _ in range(self.spares - len(self._pool) - self._filling):
            self._filling += 1
            self._filler.submit(self._make_spare)

    def _make_spare(self) -> None:
        sbx = None
        try:
            sbx = Sandbox.create(env=self.env_name, home=self.home, metadata={
                "corral.run": self.run_id, "corral.role": "spare"})
        except CorralError as exc:  # no spare this time: create() forks on demand
            log.warning("could not fork a spare sandbox: %s", exc)
        with self._pool_lock:
            self._filling -= 1
            if sbx is not None and not self._closed:
                self._pool.append(sbx)
                return
        if sbx is not None:
            _destroy(sbx, self.home)

    def destroy(self, sbx: Sandbox | str | None, *, wait: bool = False,
                then: Callable[[], None] | None = None) -> None:
        """Destroy a sandbox (in the background unless ``wait``), then call ``then``;
        gone already is fine."""

        def job() -> None:
            if sbx is not None:
                _destroy(sbx, self.home)
            if then is not None:
                then()

        if wait:
            job()
        elif sbx is not None or then is not None:
            self._reaper.submit(job)

    def close(self) -> None:
        """Destroy the spares; wait for every destroy under way."""
        with self._pool_lock:
            self._closed = True
            spares, self._pool = self._pool, []
        self._filler.shutdown(wait=True, cancel_futures=True)
        for sbx in spares:
            self._reaper.submit(_destroy, sbx, self.home)
        self._reaper.shutdown(wait=True)

    def reconcile(self, keep: set[str]) -> list[str]:
        """Destroy this run's sandboxes that no task refers to (after a crash)."""
        gone = []
        for sbx in Sandbox.list(metadata={"corral.run": self.run_id}, home=self.home):
            if sbx.id not in keep:
                _destroy(sbx, self.home)
                gone.append(sbx.id)
        return gone


#: the nice value of the threads that destroy sandboxes and fork spares
BACKGROUND_NICE = 10


def _background() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one), and so
    that of the processes it starts (mount, umount, bwrap): on a busy machine a
    spare being forked or a used sandbox being torn down waits, and the tasks on the
    critical path (a fetch, a CI run, a merge) go first."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def _destroy(sbx: Sandbox | str, home: str | Path | None) -> None:
    try:
        handle = sbx if isinstance(sbx, Sandbox) else Sandbox.connect(sbx, home=home)
        handle.destroy()
    except CorralError as exc:
        log.debug("destroy %s: %s", sbx, exc)


def run_checked(sbx: Sandbox, cmd: str, what: str, timeout: float = 120,
                env: Mapping[str, str] | None = None) -> str:
    r = sbx.commands.run(cmd, cwd=WORKDIR, timeout=timeout, env={**GIT_ENV, **(env or {})})
    if r.exit_code != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise SandboxError(f"{what} failed: {tail[-1] if tail else f'exit {r.exit_code}'}",
                           sandbox_id=sbx.id)
    return r.stdout


def send_commit(repo: Repo, sbx: Sandbox, sha: str, local_ref: str, hints: list[str],
                then: str | None = None, what: str = "loading the repository into the sandbox"
                ) -> None:
    """Make commit ``sha`` available in the sandbox's repository as ``local_ref``, then
    run the shell command ``then`` there: one command in the sandbox in all.

    The bundle leaves out what ``hints`` (the prebuild's commit) already hold; should
    the sandbox have lost those objects, a full bundle is sent instead.
    """
    # next to the run's repository, not in /tmp: a run killed here leaves nothing
    # outside its own directory, which the run's cleanup removes
    scratch = repo.path.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundle-", dir=scratch) as tmp:
        dest = Path(tmp) / "send.bundle"
        for exclude in (hints, []):
            ref = repo.bundle(sha, exclude, dest)
            if ref is None:  # the sandbox has it (it is in the prebuild)
                load = f"git update-ref {shlex.quote(local_ref)} {sha}"
            else:
                sbx.files.write(IN_BUNDLE, dest.read_bytes())
                load = (f"git fetch -q --no-tags {IN_BUNDLE} +{ref}:{shlex.quote(local_ref)}"
                        f"; s=$?; rm -f {IN_BUNDLE}; [ $s = 0 ]")
            cmd = f"{load} && {then}" if then else load
            r = sbx.commands.run(cmd, cwd=WORKDIR, timeout=120, env=GIT_ENV)
            if r.exit_code == 0:
                return
            if not exclude:
                tail = (r.stderr or r.stdout).strip().splitlines()
                raise SandboxError(f"{what} failed: {tail[-1] if tail else f'exit {r.exit_code}'}",
                                   sandbox_id=sbx.id)


def prepare_workspace(repo: Repo, sbx: Sandbox, sha: str, branch: str,
                      hints: list[str]) -> None:
    """Put the sandbox's /workspace at ``sha`` on a fresh branch ``branch`` (main beside
    it as origin/main)."""
    send_commit(repo, sbx, sha, "refs/remotes/origin/main", hints,
                then=f"git checkout -q -f -B {shlex.quote(branch)} {sha} && git clean -qfdx "
                     "-e .venv -e node_modules", what="checking out main in the sandbox")


#: what the sandbox runs when a turn ends: commit leftovers (when asked), then bundle
#: HEAD past the base (everything, if the agent rewrote history below it)
_TAKE_OUT = """set -e
if [ "$COMMIT" = 1 ] && [ -n "$(git status --porcelain)" ]; then
  git add -A; git commit -q -m "$MESSAGE"
fi
head=$(git rev-parse HEAD)
rm -f "$OUT"
if [ "$head" = "$BASE" ]; then echo "none"; exit 0; fi
git bundle create -q "$OUT" HEAD "^$BASE" 2>/dev/null || git bundle create -q "$OUT" HEAD
echo "$head"
"""


def export_work(repo: Repo, sbx: Sandbox, base: str, ref: str, scratch: Path, *,
                commit_message: str | None = None) -> str | None:
    """Take the sandbox's HEAD out as a bundle, verified and fetched into ``ref``; with
    ``commit_message``, first commit what the agent left uncommitted.

    Returns the commit, or None when the agent made no commits past ``base``.
    """
    env = {"OUT": OUT_BUNDLE, "BASE": base, "COMMIT": "1" if commit_message else "0",
           "MESSAGE": commit_message or ""}
    out = run_checked(sbx, _TAKE_OUT, "taking the work out of the sandbox", timeout=600,
                      env=env).strip().splitlines()
    head = out[-1].strip() if out else ""
    if head in ("", "none"):
        return None
    data = sbx.files.read(OUT_BUNDLE)
    got = repo.import_bundle(data, ref, scratch)
    if got != head:
        raise BundleRejected(f"the bundle's HEAD is {got[:12]}, the sandbox said {head[:12]}")
    return got


def fingerprint(sbx: Sandbox) -> str:
    """A cheap digest of the workspace: HEAD plus what git sees changed."""
    # --no-optional-locks: a read must not take index.lock under a working agent's git
    r = sbx.commands.run("{ git rev-parse HEAD; git --no-optional-locks status --porcelain; "
                         "git diff HEAD; } 2>/dev/null | md5sum", cwd=WORKDIR, timeout=60)
    return r.stdout.strip()
