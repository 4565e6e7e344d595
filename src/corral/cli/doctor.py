"""``corral doctor``."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli._output import console, emit_json


def doctor(json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> int:
    """Show which kernel features, tools and storage this machine offers corral."""
    from rich.table import Table

    from corral.doctor import run_checks

    checks = run_checks()
    bad = [c for c in checks if c.required and not c.ok]
    if json:
        emit_json({"ok": not bad, "checks": [c.to_json() for c in checks]})
        return 1 if bad else 0
    t = Table(box=None, pad_edge=False)
    for col in ("AREA", "CHECK", "", "DETAIL", "FIX"):
        t.add_column(col)
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else
                                            "[yellow]optional[/]")
        t.add_row(c.area, c.name, mark, c.detail, "" if c.ok else c.fix)
    console.print(t)
    return 1 if bad else 0
