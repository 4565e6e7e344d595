"""gitops.Repo against real git repositories: landing a change, and the answers it
keeps about commits (which must never go stale)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.orchestrator.conftest import git as _git

from corral.orchestrator.gitops import TRAILER, Repo


def git(cwd: Path, *args: str) -> str:
    return _git(cwd, *args).strip()


def commit(work: Path, name: str, content: str) -> str:
    (work / name).write_text(content)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"edit {name}")
    return git(work, "rev-parse", "HEAD")


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Repo, Path]:
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    commit(work, "a.txt", "a\n")
    repo = Repo.open(tmp_path / "repo.git")
    return repo, work


def fetch(repo: Repo, work: Path) -> None:
    repo.git("fetch", "-q", str(work), "+refs/heads/*:refs/heads/*")


@pytest.mark.parametrize("by_name", [False, True])
def test_merge_already_on_main_fast_forward_and_diverged(repos, by_name: bool) -> None:
    repo, work = repos
    base = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "-q", "-b", "task")
    head = commit(work, "b.txt", "b\n")
    git(work, "checkout", "-q", "main")
    fetch(repo, work)

    def name(sha: str, ref: str) -> str:
        return ref if by_name else sha

    # main is behind the task: a fast-forward
    res = repo.merge(name(base, "main"), name(head, "task"), method="rebase", task_id="t",
                     title="T")
    assert res.fast_forward and res.commit == (head if not by_name else "task")
    # the task is on main already
    res = repo.merge(name(head, "task"), name(base, "main"), method="rebase", task_id="t",
                     title="T")
    assert res.commit is None and "already on main" in res.conflicts[0].hunks[0]
    # main moved on: the task's commit is replayed on it, with the task's trailer
    main = commit(work, "c.txt", "c\n")
    fetch(repo, work)
    res = repo.merge(name(main, "main"), name(head, "task"), method="rebase", task_id="t",
                     title="T")
    assert res.commit and not res.fast_forward
    assert repo.git("rev-parse", f"{res.commit}^").strip() == main
    assert f"{TRAILER}: t" in repo.git("log", "-1", "--format=%B", res.commit)
    files = repo.git("ls-tree", "--name-only", res.commit).split()
    assert files == ["a.txt", "b.txt", "c.txt"]


def test_answers_about_missing_commits_are_not_kept(repos) -> None:
    """A commit the repository does not have yet gets no remembered answer: once a
    fetch brings it, the truth is told."""
    repo, work = repos
    fetch(repo, work)
    base = git(work, "rev-parse", "HEAD")
    later = commit(work, "b.txt", "b\n")
    assert repo.is_ancestor(base, later) is False  # not fetched: no such object here
    fetch(repo, work)
    assert repo.is_ancestor(base, later) is True
    assert repo.is_ancestor(later, base) is False
    assert repo.is_ancestor(later, base) is False  # remembered, still right
    assert repo.tree(later) == git(work, "rev-parse", "HEAD^{tree}")
    # names move, so answers about names are asked each time
    assert repo.tree("main") == repo.tree(later)
    commit(work, "c.txt", "c\n")
    fetch(repo, work)
    assert repo.tree("main") == git(work, "rev-parse", "HEAD^{tree}") != repo.tree(later)
