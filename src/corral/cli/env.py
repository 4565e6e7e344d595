"""``corral env ...``: real dev environments (prebuilds and parity checks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from corral.cli._output import console, emit_json

app = typer.Typer(help="Build and check dev environments (prebuilds).", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
Repo = Annotated[Path, typer.Argument(help="Repository root (default: the current directory).")]


@app.command()
def build(
    repo: Repo = Path("."),
    name: Annotated[str | None, typer.Option(help="Environment name (default: the repo's "
                                             "directory name).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the key did not change.")
                     ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show setup output.")
                       ] = False,
    json: Json = False,
) -> None:
    """Run the repo's setup once in a sandbox and seal it as the prebuild."""
    from corral.compute import environment

    def out(b: bytes) -> None:
        if verbose and not json:
            sys.stderr.buffer.write(b)
            sys.stderr.buffer.flush()

    if json:
        res = environment.build(repo, name=name, force=force)
        emit_json(res.to_json())
        return
    with console.status("building environment") as status:

        def progress(msg: str) -> None:
            status.update(msg)
            console.log(msg)

        res = environment.build(repo, name=name, force=force, output=out, progress=progress)
    state = "cached" if res.cached else f"built in {res.seconds:.1f}s"
    console.print(f"environment [bold]{res.name}[/]: {state}, prebuild {res.snapshot_id}")


@app.command()
def check(
    repo: Repo = Path("."),
    name: Annotated[str | None, typer.Option(help="Environment name.")] = None,
    json: Json = False,
) -> int:
    """Run the repo's CI command in a fresh sandbox and on the host, side by side.

    Exits 1 when the two disagree."""
    from rich.table import Table

    from corral.compute import environment

    if json:
        res = environment.check(repo, name=name)
        emit_json(res.to_json())
        return 0 if res.agree else 1
    with console.status("checking") as status:
        res = environment.check(repo, name=name, progress=status.update)
    t = Table(title=f"ci: {res.command}", box=None, pad_edge=False)
    t.add_column("")
    t.add_column("sandbox")
    t.add_column("host")

    def counts(c: dict[str, int] | None) -> str:
        return " ".join(f"{k}={v}" for k, v in c.items() if v) if c else "-"

    def verdict(ok: bool) -> str:
        return "[green]pass[/]" if ok else "[red]fail[/]"

    t.add_row("result", verdict(res.sandbox.passed), verdict(res.host.passed))
    t.add_row("exit code", str(res.sandbox.exit_code), str(res.host.exit_code))
    t.add_row("duration", f"{res.sandbox.seconds:.2f}s", f"{res.host.seconds:.2f}s")
    t.add_row("tests", counts(res.sandbox.counts), counts(res.host.counts))
    console.print(t)
    if res.agree:
        console.print("[green]same result in the sandbox and on the host[/]")
        return 0
    console.print("[red]the sandbox and the host disagree[/]")
    for side in (res.sandbox, res.host):
        console.print(f"[bold]{side.where}[/] last lines:")
        for line in side.tail:
            console.print(f"  {line}", markup=False)
    return 1


@app.command(name="ls")
def ls(json: Json = False) -> None:
    """List built environments."""
    from rich.table import Table

    from corral.compute import environment

    envs = environment.list_environments()
    if json:
        emit_json(envs)
        return
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "PREBUILD", "KEY", "BUILT", "REPO"):
        t.add_column(col)
    for e in envs:
        t.add_row(e["name"], e["snapshot"], e["key"], e["built_at"][:19], e["repo"])
    console.print(t)


@app.command(name="import")
def import_(
    source: Annotated[Path, typer.Argument(help="A root filesystem directory or tarball.")],
    name: Annotated[str, typer.Argument(help="Name to use as environment.base.")],
    json: Json = False,
) -> None:
    """Import a root filesystem to use as an environment base instead of the host's."""
    from corral.compute import environment

    res = environment.import_image(source, name)
    if json:
        emit_json(res)
    else:
        console.print(f"imported {name}")
