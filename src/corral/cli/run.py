"""``corral run``, ``corral demo``: drive a plan to merged, CI-green main."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of the live view.")]

STATE_STYLE = {
    "queued": "dim", "ready": "cyan", "preparing": "cyan", "running": "yellow",
    "ci": "blue", "ci_failed": "red", "review": "magenta", "changes_requested": "red",
    "queued_to_merge": "blue", "merging": "blue", "merged": "green", "failed": "bold red",
    "needs_human": "bold red", "budget_exceeded": "bold red", "cancelled": "dim",
}


def status_table(status: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"run {status['run']} ({status['state']}) -> {status['origin']}",
              box=None, pad_edge=False, title_justify="left")
    for col in ("TASK", "STATE", "NEEDS", "ATTEMPTS", "CI", "CONFLICTS", "TOKENS", "MERGED"):
        t.add_column(col)
    for task in status["tasks"]:
        style = STATE_STYLE.get(task["state"], "")
        ci = f"{task['ci_runs']}" + (f" ({task['ci_failures']} failed)"
                                     if task["ci_failures"] else "")
        t.add_row(task["id"], f"[{style}]{task['state']}[/]",
                  ",".join(task["depends_on"]) or "-", str(task["attempts"]), ci,
                  str(task["conflicts"]), str(task["tokens"]),
                  (task["merged_commit"] or "")[:10] or (task["reason"] or "")[:40])
    return t


def drive(orch: Any, json: bool) -> dict[str, Any]:
    """Run an orchestrator with a live Rich view (or quietly for --json)."""
    if json:
        return dict(orch.run())
    from rich.live import Live

    from corral.orchestrator.engine import run_status

    result: dict[str, Any] = {}
    err: list[BaseException] = []

    def target() -> None:
        try:
            result.update(orch.run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            err.append(exc)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    with Live(console=console, refresh_per_second=4) as live:
        while th.is_alive():
            live.update(status_table(run_status(orch.run_id, home=orch.home)))
            th.join(0.25)
        live.update(status_table(run_status(orch.run_id, home=orch.home)))
    if err:
        raise err[0]
    return result


def run(
    plan: Annotated[Path | None, typer.Argument(help="A plan file (default: tasks of "
                                                "corral.yaml in --repo).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Resume run RUN.")] = None,
    repo: Annotated[Path, typer.Option(help="The repository (default: here).")] = Path("."),
    origin: Annotated[str | None, typer.Option(help="Git URL or path main lands on "
                                               "(default: merge.origin, else the "
                                               "repo's origin remote).")] = None,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", min=1,
                                                     help="Agents at once.")] = None,
    json: Json = False,
) -> int:
    """Run a plan: agents in sandboxes, CI, review, the merge queue. Exits 1 unless
    every task merged."""
    from corral.orchestrator.engine import Orchestrator
    from corral.orchestrator.plan import load_plan

    if resume:
        orch = Orchestrator.resume(resume)
    else:
        p = load_plan(repo.resolve(), plan.resolve() if plan else None)
        orch = Orchestrator.create(p, repo, origin=origin, plan_path=plan,
                                   max_parallel=max_parallel)
        if not json:
            console.print(f"run [bold]{orch.run_id}[/]: {len(p.tasks)} tasks")
    status = drive(orch, json)
    if json:
        emit_json(status)
    else:
        console.print(f"run {status['run']}: {status['state']}; main is "
                      f"{(status['main_commit'] or '')[:10]}")
    return 0 if status["state"] == "finished" else 1


def demo(
    examples: Annotated[Path | None, typer.Option(help="The demo directory "
                                                  "(default: examples/demo).")] = None,
    json: Json = False,
    harness: Annotated[str | None, typer.Option(
        help="Run the plan with a real agent CLI (claude-code, codex, aider) against a "
             "fake model behind corral's proxy (offline; installs the CLI if needed).")
    ] = None,
) -> int:
    """The main job, offline: a sample repo, a 7-task plan, scripted agents, a CI
    failure fixed by its reaction, a conflict resolved by its reaction."""
    from corral.orchestrator.demo import run_demo

    if json:
        summary = run_demo(examples, harness=harness)
        emit_json(summary)
        return 0 if summary["state"] == "finished" else 1

    from rich.live import Live

    from corral.orchestrator.engine import run_status

    holder: dict[str, Any] = {}
    box: dict[str, Any] = {}
    done = threading.Event()
    th = threading.Thread(target=_demo_thread, args=(examples, box, holder, done, harness),
                          daemon=True)
    th.start()
    with Live(console=console, refresh_per_second=4) as live:
        while not done.wait(0.25):
            orch = holder.get("orch")
            if orch is not None:
                live.update(status_table(run_status(orch.run_id, home=orch.home)))
        orch = holder.get("orch")
        if orch is not None:
            live.update(status_table(run_status(orch.run_id, home=orch.home)))
    if "error" in box:
        raise box["error"]
    s = box["summary"]
    console.print()
    console.print(f"[bold]tasks merged:[/] {s['merged']}/{s['tasks']}   "
                  f"[bold]CI runs:[/] {s['ci_runs']} ({s['ci_failures']} failed, fixed by "
                  f"the ci_failed reaction)   [bold]conflicts resolved:[/] {s['conflicts']}   "
                  f"[bold]tokens:[/] {s['tokens']}   [bold]wall time:[/] {s['wall_seconds']}s")
    console.print("[bold]main's log:[/]")
    for line in s["main_log"]:
        console.print(f"  {line}", markup=False)
    for task, m in (s.get("metered") or {}).items():  # a --harness dry run
        console.print(f"  metered by the proxy: {task}: {m['input_tokens']} in + "
                      f"{m['output_tokens']} out tokens in {m['requests']} model calls",
                      markup=False)
    console.print(f"origin kept at {s['origin']}; see `corral status {s['run']} --json`")
    return 0 if s["state"] == "finished" else 1


def _demo_thread(examples: Path | None, box: dict[str, Any], holder: dict[str, Any],
                 done: threading.Event, harness: str | None = None) -> None:
    from corral.orchestrator.demo import run_demo

    try:
        box["summary"] = run_demo(examples, on_orchestrator=lambda o: holder.update(orch=o),
                                  harness=harness)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
        box["error"] = exc
    finally:
        done.set()
