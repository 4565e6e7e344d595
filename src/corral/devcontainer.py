"""Reading ``.devcontainer/devcontainer.json`` where a repo has no ``corral.yaml``.

Supported subset (everything else is ignored, and listed by ``unsupported``):

- ``onCreateCommand``, ``updateContentCommand``, ``postCreateCommand``: run in
  that order as setup steps (string, array of argv, or object of named commands);
- ``containerEnv`` and ``remoteEnv``: environment variables (``${localEnv:X}``
  is expanded from the host, other ``${...}`` forms are left as they are);
- ``remoteUser``/``containerUser``: ``root`` runs as root inside the sandbox's user
  namespace; any other name runs as the unprivileged ``agent`` user.

Not supported: ``image``, ``build``/``dockerFile`` and ``features`` (the base is
the host's root filesystem or an image imported with ``corral env import``),
``workspaceFolder`` (the workspace is always ``/workspace``), ports, mounts and
lifecycle commands that run on attach/start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from corral.config import EnvironmentConfig
from corral.errors import ConfigError

_SETUP_KEYS = ("onCreateCommand", "updateContentCommand", "postCreateCommand")
_KNOWN = {*_SETUP_KEYS, "containerEnv", "remoteEnv", "remoteUser", "containerUser", "name",
          "workspaceFolder", "customizations", "$schema"}


def find_devcontainer(repo: Path) -> Path | None:
    for rel in (".devcontainer/devcontainer.json", ".devcontainer.json"):
        p = repo / rel
        if p.is_file():
            return p
    return None


def strip_jsonc(text: str) -> str:
    """Remove // and /* */ comments and trailing commas, outside strings."""
    out = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def _commands(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [shlex.join(str(a) for a in value)]
    if isinstance(value, dict):
        return [c for v in value.values() for c in _commands(v)]
    raise ValueError(f"not a command: {value!r}")


def _expand(value: str) -> str:
    return re.sub(r"\$\{localEnv:([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}",
                  lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(strip_jsonc(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be an object")
    return data


def unsupported(path: Path) -> list[str]:
    """Keys of the file that corral does not apply."""
    return sorted(k for k in load(path) if k not in _KNOWN)


def from_devcontainer(path: Path) -> EnvironmentConfig:
    data = load(path)
    try:
        setup = [c for k in _SETUP_KEYS for c in _commands(data.get(k))]
    except ValueError as exc:
        raise ConfigError(f"{path}:1: {exc}") from None
    env = {**data.get("containerEnv", {}), **data.get("remoteEnv", {})}
    user = data.get("remoteUser") or data.get("containerUser") or "agent"
    try:
        return EnvironmentConfig(
            setup=setup,
            env={str(k): _expand(str(v)) for k, v in env.items() if v is not None},
            user="root" if user == "root" else "agent",
        )
    except ValidationError as exc:
        raise ConfigError(f"{path}:1: {exc.errors()[0]['msg']}") from None
