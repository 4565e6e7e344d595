"""Output helpers shared by every CLI command: JSON or Rich, and one-line errors."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (one document, newline-terminated)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True,
                      emoji=False)
    raise SystemExit(code)


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """``["K=V", ...]`` -> dict; a malformed item is a usage error (exit 2)."""
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            fail(f"{what} {item!r} is not KEY=VALUE", 2)
        out[k] = v
    return out
