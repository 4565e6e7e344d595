"""``corral status``, ``logs``, ``review``, ``cancel``: look at and steer runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from corral.cli._output import console, emit_json

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="The run (default: the latest).")]


def status(
    run: Annotated[str | None, typer.Argument(help="The run (default: the latest).")] = None,
    json: Json = False,
) -> None:
    """Show a run: each task's state, attempts, CI rounds, tokens and merged commit."""
    from corral.cli.run import status_table
    from corral.orchestrator.engine import latest_run, run_status

    st = run_status(run or latest_run())
    if json:
        emit_json(st)
    else:
        console.print(status_table(st))


def _task_run(task: str, run: str | None) -> str:
    from sqlalchemy import select

    from corral.compute.context import get_context
    from corral.errors import NotFound
    from corral.store.orchestrator_models import RunRow, TaskRow

    ctx = get_context()
    with ctx.store.session() as s:
        if run:
            if s.get(TaskRow, (run, task)) is None:
                raise NotFound(f"run {run} has no task {task!r}")
            return run
        row = s.scalars(select(RunRow).join(TaskRow, TaskRow.run_id == RunRow.id)
                        .where(TaskRow.id == task).order_by(RunRow.created_at.desc())).first()
    if row is None:
        raise NotFound(f"no run has a task {task!r}")
    return row.id


def logs(
    task: Annotated[str, typer.Argument(help="The task id.")],
    run: RunOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")
                      ] = False,
    json: Json = False,
) -> None:
    """Print a task's agent events (every attempt), and its lifecycle events."""
    import json as _json

    from sqlalchemy import select

    from corral.compute.context import get_context
    from corral.harness.events import iter_events
    from corral.store.orchestrator_models import AttemptRow, TaskRow

    run_id = _task_run(task, run)
    ctx = get_context()
    printed: dict[str, int] = {}
    while True:
        with ctx.store.session() as s:
            attempts = list(s.scalars(select(AttemptRow).where(
                AttemptRow.run_id == run_id, AttemptRow.task_id == task)
                .order_by(AttemptRow.number)))
            t = s.get(TaskRow, (run_id, task))
        for a in attempts:
            evs = list(iter_events(Path(a.log_path)))
            for ev in evs[printed.get(a.log_path, 0):]:
                if json:
                    print(_json.dumps({"attempt": a.number, **ev.to_json()}), flush=True)
                else:
                    text = ev.data.get("text") or ev.data.get("command") or \
                        ev.data.get("path") or ev.data.get("message") or \
                        {k: v for k, v in ev.data.items() if k != "session_id"}
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.t))
                    console.print(f"{stamp} #{a.number} [bold]{ev.kind.value:9}[/] {text}",
                                  markup=True, highlight=False, soft_wrap=True)
            printed[a.log_path] = len(evs)
        from corral.orchestrator.states import TaskState

        if not follow or t is None or TaskState(t.state).terminal:
            return
        time.sleep(0.3)


review_app = typer.Typer(help="Approve or reject tasks waiting for review "
                         "(review.mode: human).", no_args_is_help=True)


def _post_review(kind: str, task: str, run: str | None, reason: str | None) -> str:
    from corral.compute.context import get_context
    from corral.errors import UsageError
    from corral.orchestrator.records import post_inbox
    from corral.store.orchestrator_models import TaskRow

    run_id = _task_run(task, run)
    ctx = get_context()
    with ctx.store.session() as s:
        t = s.get(TaskRow, (run_id, task))
    assert t is not None
    if t.state != "review":
        raise UsageError(f"task {task} is {t.state}, not waiting for review")
    post_inbox(ctx, run_id, kind, task, reason=reason, by="cli")
    return run_id


@review_app.command()
def approve(task: Annotated[str, typer.Argument(help="The task id.")], run: RunOpt = None,
            json: Json = False) -> None:
    """Approve a task: it goes to the merge queue."""
    run_id = _post_review("approve", task, run, None)
    if json:
        emit_json({"run": run_id, "task": task, "decision": "approve"})
    else:
        console.print(f"approved {task} (run {run_id})")


@review_app.command()
def reject(task: Annotated[str, typer.Argument(help="The task id.")], run: RunOpt = None,
           reason: Annotated[str, typer.Option(help="What to change (sent to the agent).")
                             ] = "changes requested",
           json: Json = False) -> None:
    """Ask for changes: the reason goes to the agent as the changes_requested reaction."""
    run_id = _post_review("reject", task, run, reason)
    if json:
        emit_json({"run": run_id, "task": task, "decision": "reject", "reason": reason})
    else:
        console.print(f"changes requested on {task} (run {run_id})")


def cancel(
    target: Annotated[str, typer.Argument(help="A run id (run-...) or a task id.")],
    run: RunOpt = None,
    json: Json = False,
) -> None:
    """Cancel a whole run or one task; running agents are stopped."""
    from corral.compute.context import get_context
    from corral.orchestrator.records import post_inbox
    from corral.store.orchestrator_models import RunRow

    ctx = get_context()
    with ctx.store.session() as s:
        is_run = s.get(RunRow, target) is not None
    if is_run:
        run_id, task = target, None
    else:
        run_id, task = _task_run(target, run), target
    post_inbox(ctx, run_id, "cancel", task)
    _cancel_if_idle(run_id, task)
    if json:
        emit_json({"run": run_id, "task": task, "cancel": "requested"})
    else:
        console.print(f"cancel requested for {task or 'run'} ({run_id})")


def _cancel_if_idle(run_id: str, task: str | None) -> None:
    """With no orchestrator driving the run, cancel in the store directly."""
    from corral.compute.context import get_context
    from corral.orchestrator.engine import LEASE_SECONDS
    from corral.orchestrator.records import Records
    from corral.orchestrator.states import TaskState
    from corral.store.orchestrator_models import RunRow

    ctx = get_context()
    with ctx.store.session() as s:
        r = s.get(RunRow, run_id)
    if r is None or (r.owner and time.time() - r.heartbeat < LEASE_SECONDS):
        return
    rec = Records(ctx, run_id, time.monotonic)
    for t in rec.tasks():
        if (task is None or t.id == task) and not TaskState(t.state).terminal:
            rec.transition(t.id, TaskState.CANCELLED, reason="cancelled by request")
            if t.sandbox_id:
                from corral.orchestrator.sandboxes import _destroy

                _destroy(t.sandbox_id, None)
    if task is None:
        rec.update_run(state="cancelled")
    for item in rec.inbox():
        rec.handled(item.id)
