"""The config reference names every key corral.yaml accepts (docs cannot drift)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from corral.config import RepoConfig

DOC = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out.extend(_keys(sub, f"{prefix}{name}."))  # its keys, not itself
        else:
            out.append((prefix, name))
    return out


def _section(name: str) -> str:
    head = f"## `{name}`"
    assert head in DOC, f"docs/config.md has no section for {name}"
    return DOC.split(head, 1)[1].split("\n## ", 1)[0]


def test_every_config_key_is_documented() -> None:
    missing = []
    for prefix, name in _keys(RepoConfig):
        if name == "source" or not prefix:
            continue
        section, _, inner = prefix.partition(".")
        key = f"{inner}{name}"
        if f"`{key}`" not in _section(section):
            missing.append(prefix + name)
    from corral.config import TaskConfig

    missing += [f"tasks.{n}" for _, n in _keys(TaskConfig) if f"`{n}`" not in _section("tasks")]
    for top in ("prompts", "policy", "tasks"):
        _section(top)
    assert not missing, f"docs/config.md does not document: {missing}"


def test_docs_examples_validate(tmp_path: Path) -> None:
    import re

    from corral.config import parse_repo_config

    block = re.search(r"```yaml\n(.*?)```", DOC, re.S)
    assert block
    (tmp_path / "corral.yaml").write_text(block.group(1))
    cfg = parse_repo_config(tmp_path / "corral.yaml")
    assert cfg.environment.limits.memory == 4 * 1024**3
    assert [t.id for t in cfg.tasks] == ["api", "client"]
