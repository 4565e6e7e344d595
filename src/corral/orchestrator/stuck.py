"""Stuck detection: several signals, one escalation ladder.

Signals: silence (no output and no workspace change for ``stuck.silence``),
the same CI failure ``repeated_failures`` times in a row, and turns that end
with the workspace exactly as before (no progress). Each signal climbs the
ladder one rung: a nudge, then "try a different approach" with a summary of
what failed, then a fresh session in a new sandbox from the last good
snapshot, then a human.
"""

from __future__ import annotations

from enum import StrEnum


class Rung(StrEnum):
    #: a follow-up asking the agent to say what blocks it and continue
    NUDGE = "nudge"
    #: a follow-up asking for another approach, with what failed so far
    DIFFERENT_APPROACH = "different_approach"
    #: a new session in a new sandbox, from the last good snapshot
    FRESH_SESSION = "fresh_session"
    #: corral gives up on the task
    NEEDS_HUMAN = "needs_human"


LADDER = (Rung.NUDGE, Rung.DIFFERENT_APPROACH, Rung.FRESH_SESSION, Rung.NEEDS_HUMAN)


def rung(level: int) -> Rung:
    """The rung for the ``level``-th stuck signal of a task (1 for the first)."""
    return LADDER[min(max(level, 1), len(LADDER)) - 1]


def silent(now: float, last_activity: float, silence: float) -> bool:
    return now - last_activity >= silence


def repeated(signatures: list[str], n: int) -> bool:
    """The last ``n`` CI failures have one signature."""
    return len(signatures) >= n and len(set(signatures[-n:])) == 1


def no_progress(fingerprints: list[str], n: int) -> bool:
    """The workspace ended the last ``n`` turns exactly as it was before them."""
    return len(fingerprints) > n and len(set(fingerprints[-(n + 1):])) == 1
