"""The ``corral`` command. Sub-apps live one per module next to this one."""

from __future__ import annotations

import logging
import os
import sys

import typer

from corral.cli import env as env_cli
from corral.cli import sandbox as sandbox_cli
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
app.add_typer(sandbox_cli.app, name="sandbox")
app.add_typer(env_cli.app, name="env")
app.command()(doctor)
# Layers above add their sub-apps here, one line each (policy, approvals, audit, run...).


def main() -> None:
    """Entry point: run the app, turning every ``CorralError`` into one line."""
    from corral.errors import CorralError

    logging.basicConfig(level=os.environ.get("CORRAL_LOG", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        rv = app(standalone_mode=False)
    except CorralError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:  # click's own usage errors and the rest
        import click

        if isinstance(exc, click.exceptions.UsageError):
            fail(exc.format_message(), 2)
        if isinstance(exc, click.exceptions.Abort):
            fail("aborted", 130)
        if isinstance(exc, click.exceptions.ClickException):
            fail(exc.format_message(), exc.exit_code)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
