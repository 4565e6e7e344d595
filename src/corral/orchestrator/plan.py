"""A plan is a task graph: ``tasks:`` of corral.yaml, or a separate plan file.

A plan file has the shape of corral.yaml; the sections it sets (``tasks``,
``agents``, ``budgets``...) replace the repository's. The graph is validated
here (duplicate ids, unknown dependencies, cycles), with errors that name the
file, the line and the tasks involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from corral.config import (
    CONFIG_NAME,
    RepoConfig,
    TaskConfig,
    format_validation_error,
    load_repo_config,
    load_yaml,
)
from corral.errors import ConfigError

#: sections of a plan file that replace the repository's
PLAN_SECTIONS = ("tasks", "agents", "review", "budgets", "stuck", "merge", "prompts", "ci")


@dataclass(frozen=True)
class Plan:
    """A validated task graph and the config it runs with."""

    tasks: tuple[TaskConfig, ...]
    config: RepoConfig
    #: the file the tasks came from (corral.yaml or the plan file)
    source: Path

    def task(self, task_id: str) -> TaskConfig:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(task_id)

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tasks]

    def depth(self) -> dict[str, int]:
        """Length of the longest dependency chain ending at each task (1 for roots)."""
        return depths({t.id: list(t.depends_on) for t in self.tasks})

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "config": self.config.model_dump(mode="json")}


def depths(deps: dict[str, list[str]]) -> dict[str, int]:
    out: dict[str, int] = {}

    def d(t: str) -> int:
        if t not in out:
            out[t] = 1 + max((d(x) for x in deps.get(t, []) if x in deps), default=0)
        return out[t]

    for t in deps:
        d(t)
    return out


def load_plan(repo: Path, plan_file: Path | None = None) -> Plan:
    """The plan of ``repo``: its corral.yaml tasks, or ``plan_file``'s.

    Raises ``ConfigError`` (one line: file, line, key) for anything invalid.
    """
    base = load_repo_config(repo)
    if plan_file is None:
        source = repo / CONFIG_NAME
        lines = load_yaml(source)[1] if source.exists() else {}
        cfg = base
    else:
        source = plan_file
        data, lines = load_yaml(plan_file)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{plan_file}:1: a plan is a mapping with a `tasks:` list")
        unknown = sorted(set(data) - set(PLAN_SECTIONS))
        if unknown:
            line = lines.get((unknown[0],), 1)
            raise ConfigError(f"{plan_file}:{line}: {unknown[0]}: unknown key in a plan "
                              f"(one of {', '.join(PLAN_SECTIONS)})")
        merged = {**base.model_dump(mode="json", exclude={"source"}), **data,
                  "source": str(plan_file)}
        try:
            cfg = RepoConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(plan_file), lines)) from None
    if not cfg.tasks:
        raise ConfigError(f"{source}:1: tasks: the plan has no tasks")
    tasks = tuple(_resolve_script(t, source, lines, i) for i, t in enumerate(cfg.tasks))
    validate_graph(tasks, str(source), lines)
    return Plan(tasks=tasks, config=cfg, source=source)


def _resolve_script(t: TaskConfig, source: Path, lines: dict[Any, int], i: int) -> TaskConfig:
    """Read a task's script file (relative to the plan) into the task."""
    if not isinstance(t.script, str):
        if t.script is not None:
            from corral.harness.scripted import check_script

            check_script(t.script, f"{source}:{lines.get(('tasks', i, 'script'), 1)}: "
                                   f"tasks.{t.id}.script")
        return t
    path = (source.parent / t.script).resolve()
    line = lines.get(("tasks", i, "script"), 1)
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError(f"{source}:{line}: tasks.{t.id}.script: cannot read {path}") from None
    try:
        script = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}:1: invalid script: {str(exc).splitlines()[0]}") from None
    from corral.harness.scripted import check_script

    check_script(script, str(path))
    return t.model_copy(update={"script": script})


def validate_graph(tasks: tuple[TaskConfig, ...] | list[TaskConfig], where: str,
                   lines: dict[Any, int] | None = None) -> None:
    """Raise ``ConfigError`` for a duplicate id, an unknown dependency or a cycle."""
    lines = lines or {}
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.id in seen:
            line = lines.get(("tasks", i, "id"), lines.get(("tasks", i), 1))
            raise ConfigError(f"{where}:{line}: tasks: duplicate task id {t.id!r} "
                              f"(tasks {seen[t.id] + 1} and {i + 1})")
        seen[t.id] = i
    for i, t in enumerate(tasks):
        for j, dep in enumerate(t.depends_on):
            if dep not in seen:
                line = lines.get(("tasks", i, "depends_on", j),
                                 lines.get(("tasks", i), 1))
                raise ConfigError(f"{where}:{line}: tasks.{t.id}.depends_on: "
                                  f"unknown task {dep!r}")
            if dep == t.id:
                line = lines.get(("tasks", i), 1)
                raise ConfigError(f"{where}:{line}: tasks.{t.id}.depends_on: "
                                  f"a task cannot depend on itself")
    cycle = find_cycle({t.id: list(t.depends_on) for t in tasks})
    if cycle:
        line = lines.get(("tasks", seen[cycle[0]]), 1)
        raise ConfigError(f"{where}:{line}: tasks: dependency cycle "
                          + " -> ".join(cycle))


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path (first task repeated at the end), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(deps, white)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = grey
        stack.append(n)
        for m in deps.get(n, []):
            if m not in color:
                continue
            if color[m] == grey:
                return [*stack[stack.index(m):], m]
            if color[m] == white and (found := visit(m)):
                return found
        stack.pop()
        color[n] = black
        return None

    for n in deps:
        if color[n] == white and (found := visit(n)):
            return found
    return None
