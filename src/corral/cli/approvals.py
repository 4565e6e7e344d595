"""``corral approvals ...``: see and decide requests the fence holds for a human."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli._output import console, emit_json

app = typer.Typer(help="See and decide requests held for a human (`ask` rules).",
                  no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ApprovalId = Annotated[str, typer.Argument(help="Approval id (see `corral approvals ls`).")]


@app.command(name="ls")
def ls(
    all_: Annotated[bool, typer.Option("--all", help="Also decided ones.")] = False,
    sandbox: Annotated[str | None, typer.Option(help="Only this sandbox's.")] = None,
    json: Json = False,
) -> None:
    """List pending approvals (newest first)."""
    from corral.security.approvals import ApprovalQueue

    rows = ApprovalQueue.for_home().list(pending_only=not all_, sandbox_id=sandbox)
    if json:
        emit_json(rows)
        return
    if not rows:
        console.print("no pending approvals" if not all_ else "no approvals")
        return
    for r in rows:
        console.print(f"{r['id']}  {r['status']:<8} {r['sandbox']}  {r['summary']}\n"
                      f"    {r['reason']}", soft_wrap=True, markup=False, emoji=False)


@app.command()
def approve(
    approval_id: ApprovalId,
    remember: Annotated[bool, typer.Option(
        "--remember", help="Also allow this exact request shape from now on.")] = False,
    json: Json = False,
) -> None:
    """Let a held request through."""
    from corral.security.approvals import ApprovalQueue

    ap = ApprovalQueue.for_home().approve(approval_id, remember=remember)
    if json:
        emit_json({"id": ap.id, "status": ap.status, "remember": remember})
    else:
        console.print(f"{ap.id} approved{' (remembered)' if remember else ''}: {ap.summary}",
                      soft_wrap=True, markup=False)


@app.command()
def deny(
    approval_id: ApprovalId,
    reason: Annotated[str | None, typer.Option(help="Told to the agent.")] = None,
    json: Json = False,
) -> None:
    """Refuse a held request."""
    from corral.security.approvals import ApprovalQueue

    ap = ApprovalQueue.for_home().deny(approval_id, reason=reason)
    if json:
        emit_json({"id": ap.id, "status": ap.status, "reason": reason})
    else:
        console.print(f"{ap.id} denied: {ap.summary}", soft_wrap=True, markup=False)
