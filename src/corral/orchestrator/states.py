"""The states of a task, and the table of legal transitions.

Every transition is written to the store as an event row (``records.transition``);
an illegal one raises ``InvalidTransition`` instead of corrupting the run.
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidState


class TaskState(StrEnum):
    #: waiting for its dependencies to be merged
    QUEUED = "queued"
    #: every dependency is merged; waiting for a free agent slot (or a retry's backoff)
    READY = "ready"
    #: a sandbox is being forked from the prebuild with the repo at current main
    PREPARING = "preparing"
    #: the agent works in its sandbox (a start, retry or follow-up reaction)
    RUNNING = "running"
    #: the repo's CI runs on the task's commits in a fresh sandbox
    CI = "ci"
    #: CI failed; the ci_failed reaction goes back to the agent
    CI_FAILED = "ci_failed"
    #: CI passed; waiting for review (at once in auto mode, a human in human mode)
    REVIEW = "review"
    #: the reviewer asked for changes; the changes_requested reaction goes to the agent
    CHANGES_REQUESTED = "changes_requested"
    #: approved; waiting for its turn in the merge queue
    QUEUED_TO_MERGE = "queued_to_merge"
    #: in the merge queue: rebased on current main, CI again, pushed
    MERGING = "merging"
    #: on main (terminal)
    MERGED = "merged"
    #: out of attempts, or an unrecoverable error (terminal)
    FAILED = "failed"
    #: corral gave up (CI rounds, conflicts, the stuck ladder): a person must look (terminal)
    NEEDS_HUMAN = "needs_human"
    #: the task's or run's token/money budget ran out (terminal)
    BUDGET_EXCEEDED = "budget_exceeded"
    #: cancelled by a person (terminal)
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Whether the task occupies an agent slot (counts against max_parallel)."""
        return self in (TaskState.PREPARING, TaskState.RUNNING, TaskState.CI,
                        TaskState.CI_FAILED, TaskState.CHANGES_REQUESTED)


S = TaskState
TERMINAL = frozenset({S.MERGED, S.FAILED, S.NEEDS_HUMAN, S.BUDGET_EXCEEDED, S.CANCELLED})
#: where a task may go from each state; every non-terminal state may also be cancelled
#: or fail (an error nobody can recover from) or run out of budget
_STOP = {S.CANCELLED, S.FAILED, S.BUDGET_EXCEEDED, S.NEEDS_HUMAN}
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.QUEUED: frozenset({S.READY} | _STOP),
    S.READY: frozenset({S.PREPARING, S.QUEUED} | _STOP),
    # back to READY: the sandbox could not be made (retried with backoff)
    S.PREPARING: frozenset({S.RUNNING, S.READY} | _STOP),
    # RUNNING -> READY: the attempt failed and a fresh one is due (retry)
    S.RUNNING: frozenset({S.CI, S.READY, S.RUNNING} | _STOP),
    S.CI: frozenset({S.REVIEW, S.CI_FAILED, S.READY} | _STOP),
    S.CI_FAILED: frozenset({S.RUNNING, S.READY} | _STOP),
    S.REVIEW: frozenset({S.QUEUED_TO_MERGE, S.CHANGES_REQUESTED} | _STOP),
    S.CHANGES_REQUESTED: frozenset({S.RUNNING, S.READY} | _STOP),
    S.QUEUED_TO_MERGE: frozenset({S.MERGING} | _STOP),
    # MERGING -> RUNNING: a conflict (the conflict reaction); -> CI_FAILED: CI failed
    # after the rebase; -> QUEUED_TO_MERGE: main moved under the push, go again
    S.MERGING: frozenset({S.MERGED, S.RUNNING, S.CI_FAILED, S.QUEUED_TO_MERGE} | _STOP),
    S.MERGED: frozenset(),
    S.FAILED: frozenset(),
    S.NEEDS_HUMAN: frozenset(),
    S.BUDGET_EXCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
}


class InvalidTransition(InvalidState):
    """A task was asked to move where its state machine does not allow."""


def check(task_id: str, old: TaskState, new: TaskState) -> None:
    """Raise ``InvalidTransition`` unless ``old -> new`` is in the table."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(
            f"task {task_id}: cannot go from {old.value} to {new.value}", state=old.value)
