"""``corral policy ...``: validate a security policy and try requests against it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json

app = typer.Typer(help="Validate security policies and try requests against them.",
                  no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
PolicyFile = Annotated[Path, typer.Argument(help="A policy file (see docs/policy.md).")]


@app.command()
def check(file: PolicyFile, json: Json = False) -> None:
    """Validate a policy file: exit 0 with a summary, or 2 with `file:line: key: error`."""
    from corral.security.policy import load_policy

    policy = load_policy(file)  # ConfigError: one line, exit 2
    if json:
        emit_json({"ok": True, "file": str(file), "summary": policy.summary(),
                   "policy": policy.model_dump(mode="json")})
    else:
        console.print(f"ok: {file}: {policy.summary()}", soft_wrap=True, markup=False)


@app.command()
def decide(
    file: PolicyFile,
    method: Annotated[str, typer.Argument(help="HTTP method, e.g. GET.")],
    url: Annotated[str, typer.Argument(help="Full URL, e.g. https://api.github.com/user.")],
    push: Annotated[list[str] | None, typer.Option(
        help="For a git push URL: a ref pushed (repeatable), e.g. refs/heads/main.")] = None,
    delete: Annotated[list[str] | None, typer.Option(
        help="For a git push URL: a ref deleted (repeatable).")] = None,
    json: Json = False,
) -> None:
    """Show what the policy decides for one request (no network traffic)."""
    from corral.security.canon import Rejected, check_request
    from corral.security.engine import Engine
    from corral.security.policy import load_policy
    from corral.security.types import ZERO_SHA, RefUpdate

    engine = Engine(load_policy(file))
    scheme = "https" if url.lower().startswith("https://") else "http"
    req = check_request(method, url, [], scheme=scheme, http_version="1.0",  # type: ignore[arg-type]
                        relax=engine.path_relaxations)
    result: dict[str, Any]
    if isinstance(req, Rejected):
        result = {"action": "deny", "reason": req.reason, "rule": None, "ref": None}
    else:
        some = "1" * 40
        updates = [RefUpdate(ZERO_SHA, some, r) for r in push or []]
        updates += [RefUpdate(some, ZERO_SHA, r) for r in delete or []]
        d = engine.decide(req.view("cli", git_updates=updates))
        result = {"action": d.action, "reason": d.reason, "rule": d.rule, "ref": d.ref}
    if json:
        emit_json(result)
    else:
        rule = f" (network.rules[{result['rule']}])" if result["rule"] is not None else ""
        console.print(f"{result['action']}{rule}: {result['reason']}", soft_wrap=True,
                      markup=False)
