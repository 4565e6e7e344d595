"""``corral audit ...``: read and verify the installation's audit log."""

from __future__ import annotations

import json as _json
import sys
from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json, fail

app = typer.Typer(help="Read and verify the hash-chained audit log.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _line(rec: Any) -> str:
    who = " ".join(x for x in (rec.sandbox, rec.task) if x) or "-"
    details = _json.dumps(rec.details, sort_keys=True, default=str)
    if len(details) > 300:
        details = details[:297] + "..."
    return f"{rec.seq:>6} {rec.time} {who} {rec.actor} {rec.event} {details}"


@app.command()
def tail(
    sandbox: Annotated[str | None, typer.Option(help="Only records of this sandbox.")] = None,
    n: Annotated[int, typer.Option("-n", "--lines", help="How many records.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new records.")] = False,
    json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """Print the last records of the audit log."""
    from dataclasses import asdict

    from corral.security.audit import AuditLog

    log = AuditLog.for_home()

    def show(rec: Any) -> None:
        if json:
            sys.stdout.write(_json.dumps(asdict(rec), sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            console.print(_line(rec), soft_wrap=True, markup=False, emoji=False)

    for rec in log.tail(n, sandbox=sandbox):
        show(rec)
    if follow:
        try:
            for rec in log.follow(sandbox=sandbox):
                show(rec)
        except KeyboardInterrupt:
            return


@app.command()
def verify(json: Json = False) -> None:
    """Check the hash chain; exit 1 naming the first broken record."""
    from corral.security.audit import AuditLog

    log = AuditLog.for_home()
    res = log.verify()
    if json:
        emit_json({"ok": res.ok, "records": res.records, "broken_seq": res.broken_seq,
                   "line": res.line, "file": res.file, "message": str(res),
                   "path": str(log.path), "segments": [p.name for p in log.segments()]})
        if not res.ok:
            raise typer.Exit(1)
        return
    if not res.ok:
        fail(f"{log.path}: {res}", 1)
    console.print(f"{log.path}: {res}", soft_wrap=True, markup=False)
