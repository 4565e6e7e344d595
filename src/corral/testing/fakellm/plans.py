"""A model script from a plan's scripted-harness scripts, so the same plan runs
with a real agent CLI against the fake model: each task's steps per reaction
become one model turn whose actions the CLI carries out with its own tools.

Rules are keyed by the opening line of corral's reaction prompts (the shipped
templates), which name the task: ``You are working on task ID:`` (start and
retry), ``CI failed on your change for task ID``, ``Your change for task ID ...
no longer applies`` (conflict), ``A reviewer asked for changes on task ID``,
and the stuck prompts. ``REACTION@N`` keys match the N-th CI round or conflict.

Steps map as: ``say`` -> text, ``write`` / ``append`` -> the same actions, a
plain ``sed -i 's/OLD/NEW/' FILE`` -> an edit, ``delete`` / ``patch`` / other
``run`` / ``commit`` -> commands, ``usage`` -> the
turn's reported usage, ``sleep`` -> a delay; ``work``, ``tool``, ``hang`` and
``exit`` have no model-side meaning and are dropped. Tool-less clients (Aider)
cannot run commands: there, corral's ``agents.auto_commit`` commits the work.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from corral.testing.fakellm.script import Script

#: the first line of each reaction's prompt, with {id} for the task id
OPENINGS = {
    "start": r"^You are working on task {id}:",
    "retry": r"^You are working on task {id}:",
    "ci_failed": r"^CI failed on your change for task {id} ",
    "conflict": r"^Your change for task {id} \(",
    "changes_requested": r"^A reviewer asked for changes on task {id} ",
    "stuck": r"^(You seem to be stuck on task {id} |Task {id} \(.*\) is still not moving)",
}
#: what tells the N-th occurrence apart, for REACTION@N keys
OCCURRENCE = {"ci_failed": r"This is CI round {n} of", "conflict": r"\(conflict {n} of"}
_SED = re.compile(r"^sed -i 's/([^/']+)/([^/']*)/' (\S+)$")
_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")
#: usage of the closing turn and of anything unscripted: small and fixed, so a
#: dry run's tokens do not depend on the size of each CLI's system prompt
CLOSING_USAGE = {"input_tokens": 200, "output_tokens": 40}
DEFAULT_USAGE = {"input_tokens": 1000, "output_tokens": 200}
#: usage of each further action turn when actions are split
STEP_USAGE = {"input_tokens": 100, "output_tokens": 20}


def script_for_tasks(tasks: Mapping[str, Mapping[str, Any]], *, split: bool = True
                     ) -> Script:
    """``{task_id: scripted script}`` -> a model script (see the module docstring).

    ``split``: one action per model turn, so a client that runs the tool calls
    of one answer in parallel (Codex) still runs them in the script's order; a
    tool-less client (Aider) answers once per prompt and needs ``split=False``."""
    rules: list[dict[str, Any]] = []
    for task_id, script in tasks.items():
        tid = re.escape(task_id)
        keys = sorted(script, key=lambda k: ("@" not in k, k))  # REACTION@N first
        for key in keys:
            name, _, occ = str(key).partition("@")
            if name not in OPENINGS:
                continue
            regex = OPENINGS[name].format(id=tid)
            if occ and name in OCCURRENCE:
                regex = f"(?s){regex}.*{OCCURRENCE[name].format(n=int(occ))}"
            turn = _turn(script[key] or [])
            turns = [turn]
            if split and len(turn["do"]) > 1:
                rest = turn["do"][1:]
                turn["do"] = turn["do"][:1]
                turns += [{"do": [step], "usage": dict(STEP_USAGE)} for step in rest]
            turns.append({"text": f"Done with {key} for task {task_id}.",
                          "usage": CLOSING_USAGE})
            rules.append({"match": {"regex": regex}, "turns": turns})
    return Script.model_validate({"rules": rules,
                                  "fallback": {"text": "Nothing more to do.",
                                               "usage": CLOSING_USAGE}})


def _turn(steps: list[Any]) -> dict[str, Any]:
    text: list[str] = []
    do: list[dict[str, Any]] = []
    turn: dict[str, Any] = {"do": do, "usage": dict(DEFAULT_USAGE)}
    # one model turn carries every action, in the script's order (a conflict script
    # resets to origin/main before it writes)
    for step in steps:
        if not isinstance(step, Mapping) or len(step) != 1:
            continue
        op, arg = next(iter(step.items()))
        if op == "say":
            text.append(str(arg))
        elif op in ("write", "append"):
            do.append({op: {"path": arg["path"], "content": arg.get("content", "")}})
        elif op == "delete":
            do.append({"run": f"rm -f {shlex.quote(str(arg))}"})
        elif op == "patch":
            diff = arg["diff"] if isinstance(arg, Mapping) else str(arg)
            do.append({"run": f"git apply <<'CORRAL_PATCH'\n{diff}\nCORRAL_PATCH"})
        elif op == "run":
            cmd = str(arg["command"] if isinstance(arg, Mapping) else arg)
            m = _SED.match(cmd)
            if m and not _REGEX_CHARS.search(m.group(1).replace(".", "")):
                # a plain substitution is an edit: a tool-less client can make it too
                do.append({"edit": {"path": m.group(3), "old": m.group(1).replace("\\.", "."),
                                    "new": m.group(2)}})
            else:
                do.append({"run": cmd})
        elif op == "commit":
            do.append({"run": f"git add -A && git commit -q -m {shlex.quote(str(arg))}"})
        elif op == "usage":
            if isinstance(arg, Mapping):
                turn["usage"] = {"input_tokens": int(arg.get("input_tokens", 0)),
                                 "output_tokens": int(arg.get("output_tokens", 0))}
            else:
                turn["usage"] = {"input_tokens": int(arg), "output_tokens": 0}
        elif op == "sleep":
            turn["delay"] = float(arg)
    if text:
        turn["text"] = "\n".join(text)
    return turn
