"""``corral proxy ...``: the egress proxy daemon that fenced sandboxes go through."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json

app = typer.Typer(help="The egress proxy daemon of fenced sandboxes.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _home() -> object:
    from corral.compute.context import get_context

    return get_context().home


@app.command()
def serve() -> None:
    """Run the proxy daemon in the foreground (fenced sandboxes start it on demand)."""
    import logging
    import os

    from corral.security.daemon import serve as run

    logging.getLogger().setLevel(os.environ.get("CORRAL_LOG", "INFO").upper())
    run(_home())  # type: ignore[arg-type]


@app.command()
def status(json: Json = False) -> None:
    """Show whether the daemon runs and which sandboxes it serves."""
    from corral.security.daemon import DaemonClient

    client = DaemonClient(_home())  # type: ignore[arg-type]
    data: dict[str, Any] = (client.status() if client.ping() is not None
                            else {"ok": True, "running": False})
    data.pop("ok", None)
    data.setdefault("running", True)
    if json:
        emit_json(data)
        return
    if not data["running"]:
        console.print("proxy daemon: not running")
        return
    console.print(f"proxy daemon: running (pid {data['pid']})")
    for sid, info in data.get("sandboxes", {}).items():
        err = f"  [red]policy error: {info['policy_error']}[/]" if info.get("policy_error") \
            else ""
        console.print(f"  {sid}  {info['policy']}{err}")


@app.command()
def stop(json: Json = False) -> None:
    """Stop the daemon (fenced sandboxes lose their way out until it starts again)."""
    from corral.security.daemon import DaemonClient

    stopped = DaemonClient(_home()).stop()  # type: ignore[arg-type]
    if json:
        emit_json({"stopped": stopped})
    else:
        console.print("stopped" if stopped else "not running")
