"""The scripted agent: an offline, deterministic stand-in for a coding agent.

This file is copied into a sandbox and run there with the sandbox's
``python3`` (standard library only), so it exercises the same paths a real
agent does: it edits the workspace, runs commands and commits with git, and
prints one JSON event per line on stdout. Its script format is documented in
docs/scripted.md.

    python3 scripted_agent.py SCRIPT.json REACTION OCCURRENCE PROMPT_FILE
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

WORKDIR = os.environ.get("CORRAL_WORKDIR", "/workspace")


def emit(kind: str, **data: object) -> None:
    sys.stdout.write(json.dumps({"kind": kind, **data}) + "\n")
    sys.stdout.flush()


def steps_for(script: dict[str, Any], reaction: str, occurrence: int) -> list[Any]:
    reactions = script.get("reactions", script)
    for key in (f"{reaction}@{occurrence}", reaction):
        if key in reactions:
            return list(reactions[key] or [])
    if reaction == "retry" and "start" in reactions:
        return list(reactions["start"] or [])
    return []


def path_in_workdir(rel: str) -> str:
    full = os.path.normpath(os.path.join(WORKDIR, rel))
    if not (full == WORKDIR or full.startswith(WORKDIR + "/")):
        raise SystemExit(f"path {rel!r} leaves the workspace")
    return full


def sh(cmd: str, check: bool = True) -> int:
    r = subprocess.run(["/bin/sh", "-c", cmd], cwd=WORKDIR, capture_output=True, text=True,
                       check=False)
    tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
    emit("command", command=cmd, exit_code=r.returncode, output="\n".join(tail))
    if check and r.returncode != 0:
        emit("error", message=f"command failed (exit {r.returncode}): {cmd}")
        raise SystemExit(1)
    return r.returncode


def write(rel: str, content: str, append: bool = False) -> None:
    full = path_in_workdir(rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    existed = os.path.exists(full)
    with open(full, "a" if append else "w", encoding="utf-8") as f:
        f.write(content)
    emit("file_edit", path=rel, action="modified" if existed else "created")


def run_step(step: dict[str, Any]) -> None:
    if not isinstance(step, dict) or len(step) != 1:
        emit("error", message=f"bad step (one key per step): {step!r}")
        raise SystemExit(2)
    (op, arg), = step.items()
    if op == "say":
        emit("message", text=str(arg))
    elif op in ("write", "append"):
        write(arg["path"], arg.get("content", ""), append=op == "append")
    elif op == "delete":
        os.remove(path_in_workdir(str(arg)))
        emit("file_edit", path=str(arg), action="deleted")
    elif op == "patch":
        patch = arg if isinstance(arg, str) else arg["diff"]
        r = subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], input=patch, text=True,
                           cwd=WORKDIR, capture_output=True, check=False)
        emit("command", command="git apply", exit_code=r.returncode, output=r.stderr.strip())
        if r.returncode != 0:
            emit("error", message="patch did not apply")
            raise SystemExit(1)
    elif op == "run":
        if isinstance(arg, dict):
            sh(str(arg["command"]), bool(arg.get("check", True)))
        else:
            sh(str(arg))
    elif op == "sleep":
        time.sleep(float(arg))
    elif op == "work":  # busy for a while, reporting progress every second
        end = time.monotonic() + float(arg)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            emit("message", text="working")
    elif op == "commit":
        sh("git add -A")
        sh("git commit -q -m " + _quote(str(arg)))
    elif op == "usage":
        data = arg if isinstance(arg, dict) else {"output_tokens": int(arg)}
        emit("usage", input_tokens=int(data.get("input_tokens", 0)),
             output_tokens=int(data.get("output_tokens", 0)),
             **({"cost_usd": float(data["cost_usd"])} if "cost_usd" in data else {}))
    elif op == "tool":
        emit("tool_call", name=str(arg.get("name", "tool")), input=arg.get("input", {}))
    elif op == "hang":
        while True:  # silent and idle until stopped: what a stuck agent looks like
            time.sleep(3600)
    elif op == "exit":
        emit("finished", exit_code=int(arg))
        raise SystemExit(int(arg))
    else:
        emit("error", message=f"unknown step {op!r}")
        raise SystemExit(2)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def main(argv: list[str]) -> int:
    script_path, reaction, occurrence, prompt_file = argv[1:5]
    with open(script_path, encoding="utf-8") as f:
        script = json.load(f)
    with open(prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    session = script.get("session") or "scripted"
    emit("message", text=f"{reaction} #{occurrence}: {prompt.splitlines()[0] if prompt else ''}",
         session_id=session)
    steps = steps_for(script, reaction, int(occurrence))
    for step in steps:
        run_step(step)
    emit("finished", exit_code=0, summary=f"ran {len(steps)} steps for {reaction}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
