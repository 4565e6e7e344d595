"""Reactions: the prompts corral sends an agent, one Jinja2 template each.

Each reaction renders its own template (shipped in ``templates/``, overridable
with ``prompts:`` in corral.yaml) from a structured payload, with
``StrictUndefined`` so a template that names a missing field fails loudly
instead of sending the agent a blank.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from corral.errors import ConfigError

TEMPLATES = Path(__file__).with_name("templates")
#: every reaction, and the payload fields its template can use (besides ``task``)
REACTIONS: dict[str, tuple[str, ...]] = {
    "start": ("workdir", "branch", "base_commit", "dependencies", "ci_command"),
    "ci_failed": ("stage", "round", "max_rounds", "rebased", "main_commit", "step",
                  "exit_code", "failing_tests", "log_tail", "branch"),
    "changes_requested": ("comments", "reviewer", "branch"),
    "conflict": ("main_commit", "files", "number", "max_conflicts", "branch"),
    "stuck": ("level", "signals", "failed"),
    "retry": ("attempt", "previous", "branch", "base_commit", "ci_command"),
}

_env = jinja2.Environment(
    # prompts are plain text for an agent, not HTML
    undefined=jinja2.StrictUndefined, autoescape=False,  # noqa: S701
    keep_trailing_newline=True,
    trim_blocks=True, lstrip_blocks=True,
)


def check_overrides(prompts: Mapping[str, str], where: str = "corral.yaml") -> None:
    """Raise ``ConfigError`` for an override of an unknown reaction or bad Jinja2."""
    for name, text in prompts.items():
        if name not in REACTIONS:
            raise ConfigError(f"{where}: prompts.{name}: unknown reaction "
                              f"(one of {', '.join(REACTIONS)})")
        try:
            _env.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{where}: prompts.{name}: line {exc.lineno}: {exc.message}"
                              ) from None


def render(name: str, payload: Mapping[str, Any],
           overrides: Mapping[str, str] | None = None) -> str:
    """The prompt of reaction ``name`` for ``payload``.

    Raises ``ConfigError`` when a template uses a field the payload lacks.
    """
    if name not in REACTIONS:
        raise ValueError(f"unknown reaction {name!r}")
    text = (overrides or {}).get(name)
    source = f"prompts.{name}" if text is not None else f"templates/{name}.j2"
    if text is None:
        text = _shipped(name)
    try:
        return _compiled(text).render(**payload).strip() + "\n"
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{source}: line {exc.lineno}: {exc.message}") from None


@functools.lru_cache(maxsize=64)
def _shipped(name: str) -> str:
    return (TEMPLATES / f"{name}.j2").read_text()


@functools.lru_cache(maxsize=64)
def _compiled(text: str) -> jinja2.Template:
    """Compiling is most of a render's cost: once per template text."""
    return _env.from_string(text)
