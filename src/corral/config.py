"""``corral.yaml``: a repository's configuration, validated with pydantic.

Errors name the file, the line and the key (``corral.yaml:7: environment.setup:
Input should be a valid list``). Where a repository has no ``corral.yaml``,
``.devcontainer/devcontainer.json`` is read instead (see ``devcontainer.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from corral._units import parse_duration, parse_size
from corral.errors import ConfigError

CONFIG_NAME = "corral.yaml"


def _duration(v: Any) -> float:
    try:
        return parse_duration(v)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def _size(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return parse_size(v)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int | None, BeforeValidator(_size)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(Model):
    cpus: float | None = Field(default=None, gt=0)
    memory: Size = None
    pids: int | None = Field(default=None, ge=1)


class EnvironmentConfig(Model):
    """How to make the repo's dev environment (the prebuild every task forks from)."""

    #: ``host``: the host's own root filesystem, read-only (secrets masked); or the
    #: name of a root filesystem imported with ``corral env import``
    base: str = Field(default="host", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: commands run once, in order, in /workspace; the result is sealed as the prebuild
    setup: list[str] = Field(default_factory=list)
    #: environment variables for every command in the sandbox
    env: dict[str, str] = Field(default_factory=dict)
    #: host paths mounted read-only at the same place (toolchains under home dirs)
    expose: list[str] = Field(default_factory=list)
    user: Literal["agent", "root"] = "agent"
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    #: files whose content, with this config, keys the prebuild (added to the defaults)
    lock_files: list[str] = Field(default_factory=list)
    #: per setup command
    setup_timeout: Duration = 1800.0


class CIConfig(Model):
    """The repo's own CI command: the same in the sandbox, on the host and in corral."""

    command: str | None = None
    timeout: Duration = 1200.0
    max_rounds: int = Field(default=3, ge=1)


# -- orchestrator sections (Layer 3) --------------------------------------------------
TASK_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class AgentsConfig(Model):
    """Which harness runs the agents, and how many at once."""

    #: scripted | command | claude-code | codex | aider
    harness: str = Field(default="scripted", pattern=r"^[a-z][a-z0-9-]{0,31}$")
    max_parallel: int = Field(default=4, ge=1, le=256)
    #: for the command harness: the CLI to run, and how it gets the prompt
    command: str | None = None
    prompt_via: Literal["argument", "file", "stdin"] = "argument"
    follow_up_command: str | None = None
    #: where the real agent CLIs come from: auto (corral's cache, the pinned
    #: version installed on first use), host (the host's PATH) or layer (the
    #: environment's prebuild); unset: ``options.install``, else auto
    install: Literal["auto", "host", "layer"] | None = None
    #: adapter-specific options, passed as they are
    options: dict[str, Any] = Field(default_factory=dict)
    #: sessions per task (a fresh sandbox each) before the task fails
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: first retry waits this long; each later one twice as long
    retry_backoff: Duration = 5.0
    #: commit what the agent left uncommitted at the end of a turn
    auto_commit: bool = True
    #: one turn may run this long before it is stopped
    turn_timeout: Duration = 3600.0


class ReviewConfig(Model):
    """``auto``: merge once CI passes; ``human``: wait for ``corral review approve``."""

    mode: Literal["auto", "human"] = "auto"


class BudgetsConfig(Model):
    """Token (and optional money) budgets, nested run > task > attempt."""

    run_tokens: int | None = Field(default=None, ge=1)
    task_tokens: int | None = Field(default=None, ge=1)
    attempt_tokens: int | None = Field(default=None, ge=1)
    run_usd: float | None = Field(default=None, gt=0)
    task_usd: float | None = Field(default=None, gt=0)
    attempt_usd: float | None = Field(default=None, gt=0)


class StuckConfig(Model):
    """When an agent counts as stuck."""

    #: no output and no workspace change for this long
    silence: Duration = 600.0
    #: the same CI failure this many times in a row
    repeated_failures: int = Field(default=3, ge=2)
    #: turns in a row that change nothing
    no_progress_turns: int = Field(default=2, ge=1)


class MergeConfig(Model):
    """How changes land on the origin's main branch."""

    #: rebase: replay the task's commits on main and fast-forward;
    #: squash: one commit per task; merge: a merge commit per task
    method: Literal["rebase", "squash", "merge"] = "rebase"
    #: a git URL or path; default: the repo's ``origin`` remote
    origin: str | None = None
    branch: str = Field(default="main", pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,200}$")
    #: conflict reactions per task before it needs a human
    max_conflicts: int = Field(default=2, ge=0)
    #: queue entries tested at once, each on top of the ones ahead (1: one at a time)
    speculate: int = Field(default=4, ge=1, le=32)


class TaskConfig(Model):
    """One task of the plan."""

    id: str = Field(pattern=TASK_ID)
    title: str = Field(min_length=1)
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)
    #: overrides agents.harness for this task
    harness: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,31}$")
    #: the scripted harness's script: a mapping, or a file relative to the plan
    script: dict[str, Any] | str | None = None
    #: overrides review.mode for this task
    review: Literal["auto", "human"] | None = None
    #: adapter options for this task only
    options: dict[str, Any] = Field(default_factory=dict)


class RepoConfig(Model):
    """The whole of ``corral.yaml``. Sections of later layers are added here."""

    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    ci: CIConfig = Field(default_factory=CIConfig)
    agents: AgentsConfig = Field(default_factory=AgentsConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    stuck: StuckConfig = Field(default_factory=StuckConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    #: reaction name -> Jinja2 template text that replaces the shipped one
    prompts: dict[str, str] = Field(default_factory=dict)
    tasks: list[TaskConfig] = Field(default_factory=list)
    #: the security policy's defaults for this repo (docs/policy.md); validated by
    #: ``corral.security.policy.load_repo_policy`` with its own line-numbered errors
    policy: dict[str, Any] | None = None
    #: where the config came from: corral.yaml, devcontainer.json, or defaults
    source: str = "defaults"


def _line_map(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of a YAML document to its 1-based line."""
    out: dict[tuple[str | int, ...], int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(n: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                out[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                out[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    if node is not None:
        walk(node, ())
    return out


def format_validation_error(exc: ValidationError, where: str, lines: dict[Any, int],
                            prefix: tuple[str, ...] = ()) -> str:
    """One line: ``file:line: dotted.key: message`` for the first error.

    ``prefix`` is where the validated mapping sits in the file (a section of it).
    """
    err = exc.errors()[0]
    loc = (*prefix, *(p for p in err["loc"] if p != "[key]"))
    line = None
    for i in range(len(loc), 0, -1):
        line = lines.get(loc[:i])
        if line:
            break
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    msg = msg.removeprefix("Value error, ")
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}:{line or 1}: {dotted}: {msg}{extra}"


def load_yaml(path: Path) -> tuple[Any, dict[Any, int]]:
    """Parse a YAML file; raises ``ConfigError`` with the line of a syntax error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}") from None
    return data, _line_map(text)


def load_repo_config(repo: Path) -> RepoConfig:
    """The config of the repository at ``repo``: corral.yaml, else devcontainer.json,
    else defaults. Raises ``ConfigError`` naming the file, line and key."""
    path = repo / CONFIG_NAME
    if path.exists():
        return parse_repo_config(path)
    from corral.devcontainer import find_devcontainer, from_devcontainer

    dc = find_devcontainer(repo)
    if dc is not None:
        return RepoConfig(environment=from_devcontainer(dc), source=str(dc))
    return RepoConfig()


def parse_repo_config(path: Path) -> RepoConfig:
    data, lines = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections")
    try:
        return RepoConfig.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), lines)) from None
