"""``corral agents``: the pinned agent CLIs (list, install) and a fake model server
for dry runs (``corral agents fake-model``)."""

from __future__ import annotations

import json as jsonlib
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json, err_console, fail

app = typer.Typer(help="The agent CLIs corral runs (Claude Code, Codex, Aider), and a fake "
                  "model server to dry-run them without spending tokens.",
                  no_args_is_help=True)


@app.command("list")
def list_agents(json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
                ) -> None:
    """Show the pinned version of each agent CLI and whether it is installed."""
    from rich.table import Table

    from corral.harness.install import cache_root, cached, find_host
    from corral.harness.pins import PINS

    rows: list[dict[str, Any]] = []
    for name, pin in PINS.items():
        have = cached(name)
        host = find_host(name) if have is None else None
        rows.append({"name": name, "package": pin.package, "registry": pin.kind,
                     "pinned": pin.version, "installed": have.to_json() if have else None,
                     "host": host.to_json() if host else None})
    if json:
        emit_json({"cache": str(cache_root()), "agents": rows})
        return
    t = Table(box=None, pad_edge=False)
    for col in ("AGENT", "PACKAGE", "PINNED", "INSTALLED", "SIZE", "TIME"):
        t.add_column(col)
    for r in rows:
        inst = r["installed"]
        where = inst["prefix"] if inst else (f"host {r['host']['version']}" if r["host"]
                                            else "-")
        t.add_row(r["name"], f"{r['package']} ({r['registry']})", r["pinned"], where,
                  f"{inst['size_bytes'] / 1e6:.0f} MB" if inst and inst["size_bytes"] else "",
                  f"{inst['seconds']:.0f} s" if inst and inst["seconds"] else "")
    console.print(t)


@app.command()
def install(
    names: Annotated[list[str] | None, typer.Argument(
        help="claude-code, codex, aider (default: all three).")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Install the pinned agent CLIs into corral's cache (reused by every sandbox)."""
    from corral.harness.install import install as do_install
    from corral.harness.pins import PINS, pin_for

    wanted = names or list(PINS)
    for n in wanted:
        pin_for(n)  # a usage error names the known ones before anything starts
    out = []
    for n in wanted:
        inst = do_install(n, progress=lambda m: err_console.print(m, markup=False))
        out.append(inst.to_json())
        if not json:
            console.print(f"{n} {inst.version}: {inst.binary}")
    if json:
        emit_json({"installed": out})


@app.command("fake-model")
def fake_model(
    script: Annotated[Path | None, typer.Option(
        "--script", "-s", help="Model script (YAML/JSON): rules of turns keyed by the prompt. "
        "Without one every call gets a short final answer.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8765,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Refuse model calls that carry another key (401).")] = None,
    record: Annotated[Path | None, typer.Option(
        help="Append every request to this JSONL file.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this cert.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="...and this key.")] = None,
) -> None:
    """Serve a fake model API (Anthropic Messages, OpenAI Responses and Chat
    Completions) so a real agent CLI can dry-run a plan without spending tokens."""
    import ipaddress
    import ssl

    from corral.testing.fakellm import FakeLLM, RecordedRequest, Script

    try:
        if not ipaddress.ip_address(host).is_loopback:
            fail(f"--host {host} is not a loopback address; the fake server serves this "
                 "machine only", 2)
    except ValueError:
        fail(f"--host {host!r} is not an IP address", 2)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", 2)
    parsed = Script.load(script) if script else Script()
    ctx = None
    if tls_cert and tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(tls_cert), str(tls_key))
        except (OSError, ssl.SSLError) as exc:
            fail(f"cannot load the TLS certificate: {exc}", 2)
    try:
        server = FakeLLM(parsed, host=host, port=port, api_key=api_key, ssl_context=ctx,
                         record=record)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")

    def show(rec: RecordedRequest) -> None:
        what = f"rule {rec.rule} turn {rec.turn}" if rec.rule is not None else "fallback"
        toks = f" {rec.usage[0]}+{rec.usage[1]} tokens" if rec.usage else ""
        line = f"{rec.status} {rec.method} {rec.path}"
        if rec.api:
            line += f" [{rec.api}] {what}{toks}"
        print(line, flush=True)

    server.on_request = show
    err_console.print(f"fake model server on {server.url} (Anthropic Messages, OpenAI "
                      "Responses and Chat Completions)", markup=False)
    err_console.print("point an agent at it with agents.options.base_url: "
                      + jsonlib.dumps(server.url), markup=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
