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


class RepoConfig(Model):
    """The whole of ``corral.yaml``. Sections of later layers are added here."""

    model_config = ConfigDict(extra="allow", frozen=True)

    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    ci: CIConfig = Field(default_factory=CIConfig)
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


def format_validation_error(exc: ValidationError, where: str, lines: dict[Any, int]) -> str:
    """One line: ``file:line: dotted.key: message`` for the first error."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    line = None
    for i in range(len(loc), 0, -1):
        line = lines.get(loc[:i])
        if line:
            break
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
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
