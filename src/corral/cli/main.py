"""The ``corral`` command. Sub-apps live one per module next to this one."""

from __future__ import annotations

import logging
import os
import sys

import typer

from corral.cli import agents as agents_cli
from corral.cli import approvals as approvals_cli
from corral.cli import audit as audit_cli
from corral.cli import env as env_cli
from corral.cli import policy as policy_cli
from corral.cli import proxy as proxy_cli
from corral.cli import run as run_cli
from corral.cli import sandbox as sandbox_cli
from corral.cli import status as status_cli
from corral.cli._output import fail
from corral.cli.doctor import doctor

app = typer.Typer(
    name="corral",
    help="Run many autonomous coding agents at once: sandboxes, a policy fence, an "
    "orchestrator and harness adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Layer 1: sandboxes and environments
app.add_typer(sandbox_cli.app, name="sandbox")
app.add_typer(env_cli.app, name="env")
# Layer 3: runs of a plan
app.command()(run_cli.run)
app.command()(run_cli.demo)
app.command()(status_cli.status)
app.command()(status_cli.logs)
app.add_typer(status_cli.review_app, name="review")
app.command()(status_cli.cancel)
# Layer 2: the fence
app.add_typer(policy_cli.app, name="policy")
app.add_typer(approvals_cli.app, name="approvals")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(proxy_cli.app, name="proxy")
# Layer 4: agent CLIs
app.add_typer(agents_cli.app, name="agents")
app.command()(doctor)


def main() -> None:
    """Entry point: run the app, turning every ``CorralError`` into one line."""
    from corral.errors import CorralError

    logging.basicConfig(level=os.environ.get("CORRAL_LOG", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from corral.security.audit import install_audit

        install_audit()  # sandbox lifecycle events of this process go to the audit log
        rv = app(standalone_mode=False)
    except CorralError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:
        # click's own errors (Typer may vendor click, so match by its API, not its class)
        message = getattr(exc, "format_message", None)
        if callable(message) and isinstance(getattr(exc, "exit_code", None), int):
            fail(str(message()), int(exc.exit_code))  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            fail("aborted", 130)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
