"""Host-side git, in a repository corral owns.

The agent's work arrives as a git bundle (data, never a working tree). It is
verified and fetched here with hooks disabled, no system or global config, no
attributes file and object checks on; nothing is ever checked out on the host,
so nothing from a sandbox's tree runs or is read as configuration. Rebases and
merges are done with ``git merge-tree --write-tree`` and ``commit-tree``:
trees and commits only, no work tree.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError

#: the agent's bundle may be at most this big
MAX_BUNDLE = 256 << 20
#: a full object id (SHA-1 or SHA-256)
_OID = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?\Z")
#: answers kept by ``Repo`` (dropped all at once past this many)
MEMO_SIZE = 4096
_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
         "-c", "core.attributesFile=/dev/null", "-c", "protocol.ext.allow=never",
         "-c", "transfer.fsckObjects=true", "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
TRAILER = "Corral-Task"
#: refs that name commits being sent into sandboxes as bundles
SEND_REFS = "refs/corral/send/"


class GitError(CorralError):
    """A git operation on the host failed; the message has git's last line."""


class BundleRejected(GitError):
    """What the sandbox handed over is not an acceptable git bundle."""


@dataclass
class ConflictFile:
    path: str
    #: conflicting regions (with their markers), a few lines of context each
    hunks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "hunks": self.hunks}


@dataclass
class MergeResult:
    """The commit main would become, or the conflicts that stop it."""

    commit: str | None
    conflicts: list[ConflictFile] = field(default_factory=list)
    #: True when the task already sat on main (a plain fast-forward)
    fast_forward: bool = False


class Repo:
    """A bare repository owned by corral (``$CORRAL_HOME/runs/<run>/repo.git``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0", "GIT_DIR": str(path), "LANG": "C",
            "GIT_COMMITTER_NAME": "corral", "GIT_COMMITTER_EMAIL": "corral@localhost",
            "GIT_AUTHOR_NAME": "corral", "GIT_AUTHOR_EMAIL": "corral@localhost",
        }
        for key in ("SSH_AUTH_SOCK", "GIT_SSH_COMMAND"):  # pushing to a real remote
            if key in os.environ:
                self._env[key] = os.environ[key]
        self._lock = threading.Lock()
        self._known: set[str] = set()
        #: answers about commits named by full object ids, which never change: the
        #: merge queue asks the same ones again and again (a git exec each)
        self._memo: dict[tuple[str, ...], Any] = {}

    @classmethod
    def open(cls, path: Path) -> Repo:
        """Open (creating it if needed) the bare repository at ``path``."""
        repo = cls(path)
        if not (path / "HEAD").exists():
            path.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "-q", "--bare", str(path)], env=repo._env,
                           capture_output=True, check=True)
        return repo

    def git(self, *args: str, input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> str:
        r = subprocess.run(["git", *_SAFE, *args], env={**self._env, **(env or {})},
                           input=input, capture_output=True, check=False)
        if check and r.returncode != 0:
            err = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
            raise GitError(f"git {args[0]} failed: {err[-1] if err else r.returncode}")
        return r.stdout.decode(errors="replace")

    def run(self, *args: str, input: bytes | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", *_SAFE, *args], env={**self._env, **(env or {})},
                              input=input, capture_output=True, check=False)

    # -- reading -------------------------------------------------------------
    def rev(self, ref: str) -> str | None:
        r = self.run("rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        return r.stdout.decode().strip() or None if r.returncode == 0 else None

    def _remembered(self, key: tuple[str, ...], compute: Callable[[], Any],
                    keep: Callable[[Any], bool] = lambda _: True) -> Any:
        """``compute()``, remembered under ``key`` when every name in it is a full
        object id (what git says of those never changes) and ``keep(answer)``."""
        fixed = all(_OID.match(k) for k in key[1:])
        if fixed and key in self._memo:
            return self._memo[key]
        value = compute()
        if fixed and keep(value):
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = value
        return value

    def tree(self, commit: str) -> str:
        return str(self._remembered(("tree", commit),
                                    lambda: self.git("rev-parse", f"{commit}^{{tree}}").strip()))

    def is_ancestor(self, a: str, b: str) -> bool:
        # an exit code of 0 or 1 is an answer; others (a missing object, which a fetch
        # may bring) are asked again next time
        code = self._remembered(("is_ancestor", a, b),
                                lambda: self.run("merge-base", "--is-ancestor", a, b).returncode,
                                keep=lambda c: c in (0, 1))
        return bool(code == 0)

    def commits(self, base: str, head: str) -> list[str]:
        out = self.git("rev-list", "--reverse", f"{base}..{head}")
        return out.split()

    def log(self, ref: str, n: int = 20) -> list[str]:
        return self.git("log", "--format=%h %s", f"-{n}", ref).splitlines()

    def diff_stat(self, a: str, b: str) -> str:
        return str(self._remembered(("diff_stat", a, b), lambda: self.git(
            "diff", "--stat", "--no-color", a, b).strip()))

    def changed_files(self, a: str, b: str) -> list[str]:
        return self.git("diff", "--name-only", a, b).split()

    def set_ref(self, ref: str, sha: str) -> None:
        self.git("update-ref", ref, sha)

    def delete_ref(self, ref: str) -> None:
        self.run("update-ref", "-d", ref)

    # -- the origin ----------------------------------------------------------
    def fetch_origin(self, origin: str, branch: str) -> str | None:
        """Fetch the origin's ``branch``; its commit, or None if it has none."""
        ref = f"refs/corral/origin/{branch}"
        r = self.run("fetch", "-q", "--no-tags", origin, f"+refs/heads/{branch}:{ref}")
        if r.returncode != 0:
            if self.remote_head(origin, branch) is None:
                return None
            raise GitError(f"cannot fetch {branch} from {origin}: "
                           + r.stderr.decode(errors="replace").strip().splitlines()[-1])
        return self.rev(ref)

    def remote_head(self, origin: str, branch: str) -> str | None:
        out = self.git("ls-remote", origin, f"refs/heads/{branch}")
        return out.split()[0] if out.strip() else None

    def push(self, origin: str, sha: str, branch: str, expect: str | None) -> bool:
        """Move the origin's ``branch`` from ``expect`` to ``sha``; False if it had moved."""
        lease = f"--force-with-lease=refs/heads/{branch}:{expect or ''}"
        r = self.run("push", "-q", "--porcelain", lease, origin, f"{sha}:refs/heads/{branch}")
        if r.returncode == 0:
            return True
        text = (r.stdout + r.stderr).decode(errors="replace")
        if "stale info" in text or "rejected" in text or "fetch first" in text:
            return False
        raise GitError(f"push to {origin} failed: {text.strip().splitlines()[-1]}")

    # -- bundles -------------------------------------------------------------
    def bundle(self, sha: str, exclude: list[str], dest: Path) -> str | None:
        """Write a bundle of ``sha`` to ``dest`` without what ``exclude`` already has.

        Returns the ref name to fetch from it, or None when there is nothing to send.
        """
        exclude = [e for e in exclude if e and self.has_commit(e)]
        if sha in exclude:
            return None
        ref = f"{SEND_REFS}{sha}"  # one per commit: concurrent senders agree on it
        self.set_ref(ref, sha)
        r = self.run("bundle", "create", "-q", str(dest), ref, *(f"^{e}" for e in exclude))
        if r.returncode != 0:
            if b"empty bundle" in r.stderr:
                return None  # sha is in what the exclusions hold
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise GitError(f"git bundle failed: {err[-1] if err else r.returncode}")
        return ref

    def has_commit(self, sha: str) -> bool:
        """Whether the repository holds commit ``sha`` (remembered: commits never go)."""
        if sha in self._known:
            return True
        ok = self.rev(sha) is not None
        if ok:
            self._known.add(sha)
        return ok

    def import_bundle(self, data: bytes, ref: str, scratch: Path) -> str:
        """Verify a bundle from a sandbox and fetch its HEAD into ``ref``; the commit.

        ``git fetch`` from a bundle verifies it (header, prerequisites this repository
        must have) and, with ``transfer.fsckObjects``, every object it brings.
        Raises ``BundleRejected`` for anything but a well-formed bundle with a HEAD.
        """
        if len(data) > MAX_BUNDLE:
            raise BundleRejected(f"the bundle is {len(data) >> 20} MiB (limit "
                                 f"{MAX_BUNDLE >> 20} MiB)")
        if not data.startswith((b"# v2 git bundle\n", b"# v3 git bundle\n")):
            raise BundleRejected("not a git bundle")
        scratch.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_bytes(data)
        try:
            r = self.run("bundle", "list-heads", str(scratch))
            if r.returncode != 0:
                err = r.stderr.decode(errors="replace").strip().splitlines()
                raise BundleRejected(f"not a readable bundle: {err[-1] if err else '?'}")
            heads: dict[str, str] = {}
            for line in r.stdout.decode(errors="replace").splitlines():
                oid, _, name = line.partition(" ")
                heads[name] = oid
            sha = heads.get("HEAD", "")
            if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
                raise BundleRejected("the bundle has no HEAD")
            r = self.run("fetch", "-q", "--no-tags", "--no-write-fetch-head", str(scratch),
                         f"+HEAD:{ref}")
            if r.returncode != 0:
                err = r.stderr.decode(errors="replace").strip().splitlines()
                raise BundleRejected(f"the bundle does not verify: {err[-1] if err else '?'}")
        finally:
            scratch.unlink(missing_ok=True)
        return sha

    # -- merging -------------------------------------------------------------
    def merge(self, onto: str, head: str, *, method: str, task_id: str, title: str
              ) -> MergeResult:
        """What main (``onto``) becomes with the task's commits (``head``) landed."""
        if _OID.match(onto) and _OID.match(head):
            # one exec for both questions: the best common ancestor of the two is
            # ``head`` exactly when head is on main, ``onto`` when main is behind head
            r = self.run("merge-base", onto, head)
            base = r.stdout.decode().strip() if r.returncode == 0 else None
            on_main, behind = base == head, base == onto
        else:
            on_main = self.is_ancestor(head, onto)
            behind = not on_main and self.is_ancestor(onto, head)
        if on_main:
            return MergeResult(None, [ConflictFile("(none)", ["the change is already on main"])])
        if method == "rebase" and behind:
            return MergeResult(head, fast_forward=True)
        if method == "rebase":
            ahead = [ln.split() for ln in
                     self.git("rev-list", "--parents", f"{onto}..{head}").splitlines()]
            if len(ahead) == 1 and len(ahead[0]) == 2:
                return self._pick(onto, ahead[0][0], task_id)
            if all(len(c) <= 2 for c in ahead):  # no merge commits
                return self._replay(onto, head, task_id)
        tree, conflicts = self._merge_trees(onto, head)
        if conflicts:
            return MergeResult(None, conflicts)
        msg = f"{title}\n\n{TRAILER}: {task_id}\n"
        parents = ["-p", onto] + (["-p", head] if method == "merge" else [])
        return MergeResult(self.git("commit-tree", tree, *parents, "-m", msg).strip())

    def _merge_trees(self, a: str, b: str) -> tuple[str, list[ConflictFile]]:
        r = self.run("merge-tree", "--write-tree", "--name-only", "-z", a, b)
        if r.returncode not in (0, 1):
            raise GitError("merge-tree failed: " + r.stderr.decode(errors="replace").strip())
        parts = r.stdout.decode(errors="replace").split("\0")
        tree = parts[0].strip()
        if r.returncode == 0:
            return tree, []
        paths: list[str] = []
        for p in parts[1:]:
            if not p:
                break
            if p not in paths:
                paths.append(p)
        return tree, [ConflictFile(p, self._hunks(tree, p)) for p in paths]

    def _hunks(self, tree: str, path: str, context: int = 3, limit: int = 8) -> list[str]:
        r = self.run("cat-file", "-p", f"{tree}:{path}")
        if r.returncode != 0:
            return []
        lines = r.stdout.decode(errors="replace").splitlines()
        hunks: list[str] = []
        i = 0
        while i < len(lines) and len(hunks) < limit:
            if lines[i].startswith("<<<<<<<"):
                j = i
                while j < len(lines) and not lines[j].startswith(">>>>>>>"):
                    j += 1
                lo, hi = max(0, i - context), min(len(lines), j + 1 + context)
                body = lines[lo:hi]
                body = [re.sub(r"^(<<<<<<<|>>>>>>>) .*", r"\1", ln) for ln in body]
                hunks.append("\n".join(body[:80]))
                i = j + 1
            else:
                i += 1
        return hunks

    def _pick(self, onto: str, commit: str, task_id: str) -> MergeResult:
        """Replay the task's one commit on ``onto``: its parent is where it and ``onto``
        meet, so a plain three-way ``merge-tree`` is the cherry-pick."""
        tree, conflicts = self._merge_trees(onto, commit)
        if conflicts:
            return MergeResult(None, conflicts)
        if tree == self.tree(onto):
            return MergeResult(None, [ConflictFile("(none)", ["the change is already on main"])])
        return MergeResult(self._commit_like(commit, tree, onto, task_id))

    def _commit_like(self, commit: str, tree: str, parent: str, task_id: str) -> str:
        """A commit of ``tree`` on ``parent`` with ``commit``'s author and message (and
        the task's trailer)."""
        fmt = str(self._remembered(("meta", commit), lambda: self.git(
            "log", "-1", "--format=%an%x00%ae%x00%aI%x00%B", commit)))
        name, email, date, body = fmt.split("\0", 3)
        body = body.rstrip("\n")
        if f"{TRAILER}: " not in body:
            body += f"\n\n{TRAILER}: {task_id}"
        env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date}
        return self.git("commit-tree", tree, "-p", parent, "-m", body + "\n", env=env).strip()

    def _replay(self, onto: str, head: str, task_id: str) -> MergeResult:
        """Cherry-pick each commit of the task onto ``onto``, without a work tree.

        git 2.39's merge-tree has no ``--merge-base``; a throwaway root commit
        holding the picked commit's parent tree stands in as the merge base.
        """
        base = self.git("merge-base", onto, head).strip()
        cur = onto
        for c in self.commits(base, head):
            parent_tree = self.tree(f"{c}^")
            fixed = {"GIT_AUTHOR_DATE": "1970-01-01T00:00:00Z",
                     "GIT_COMMITTER_DATE": "1970-01-01T00:00:00Z"}
            x = self.git("commit-tree", parent_tree, "-m", "base", env=fixed).strip()
            ours = self.git("commit-tree", self.tree(cur), "-p", x, "-m", "ours",
                            env=fixed).strip()
            theirs = self.git("commit-tree", self.tree(c), "-p", x, "-m", "theirs",
                              env=fixed).strip()
            tree, conflicts = self._merge_trees(ours, theirs)
            if conflicts:
                return MergeResult(None, conflicts)
            if tree == self.tree(cur):
                continue  # the change is already there
            cur = self._commit_like(c, tree, cur, task_id)
        if cur == onto:
            return MergeResult(None, [ConflictFile("(none)", ["the change is already on main"])])
        return MergeResult(cur)
