"""Plan loading and graph validation: clear one-line errors naming the tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from corral.errors import ConfigError
from corral.orchestrator.plan import find_cycle, load_plan
from corral.orchestrator.states import TRANSITIONS, InvalidTransition, TaskState, check


def plan(tmp_path: Path, tasks: list[dict], **extra: object) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"tasks": tasks, **extra}, sort_keys=False))
    return p


def test_valid_plan_loads_with_overrides(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A"}, {"id": "b", "title": "B", "depends_on": ["a"]}],
             budgets={"run_tokens": 10})
    got = load_plan(tmp_path, p)
    assert got.ids == ["a", "b"]
    assert got.config.budgets.run_tokens == 10
    assert got.depth() == {"a": 1, "b": 2}


def test_duplicate_id_names_both_tasks(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A"}, {"id": "a", "title": "again"}])
    with pytest.raises(ConfigError, match=r"plan.yaml:\d+: tasks: duplicate task id 'a' "
                                          r"\(tasks 1 and 2\)"):
        load_plan(tmp_path, p)


def test_unknown_dependency_names_task_and_line(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A", "depends_on": ["ghost"]}])
    with pytest.raises(ConfigError) as exc:
        load_plan(tmp_path, p)
    msg = str(exc.value)
    assert "tasks.a.depends_on: unknown task 'ghost'" in msg
    assert msg.startswith(f"{p}:")
    assert "\n" not in msg


def test_cycle_is_named(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A", "depends_on": ["c"]},
                        {"id": "b", "title": "B", "depends_on": ["a"]},
                        {"id": "c", "title": "C", "depends_on": ["b"]}])
    with pytest.raises(ConfigError, match=r"dependency cycle a -> c -> b -> a"):
        load_plan(tmp_path, p)


def test_self_dependency(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A", "depends_on": ["a"]}])
    with pytest.raises(ConfigError, match="cannot depend on itself"):
        load_plan(tmp_path, p)


def test_bad_key_is_file_line_key(tmp_path: Path) -> None:
    p = tmp_path / "plan.yaml"
    p.write_text("tasks:\n  - id: a\n    title: A\n    colour: red\n")
    with pytest.raises(ConfigError, match=r"plan.yaml:4: tasks.0.colour: unknown key"):
        load_plan(tmp_path, p)


def test_bad_script_step_is_named(tmp_path: Path) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A", "script": {"start": [{"fly": 1}]}}])
    with pytest.raises(ConfigError, match=r"start\[0\]: unknown step 'fly'"):
        load_plan(tmp_path, p)


def test_find_cycle_none_for_dag() -> None:
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


def test_transition_table() -> None:
    check("t", TaskState.QUEUED, TaskState.READY)
    with pytest.raises(InvalidTransition, match="cannot go from queued to merged"):
        check("t", TaskState.QUEUED, TaskState.MERGED)
    for st in TaskState:
        assert st in TRANSITIONS
        if st.terminal:
            assert not TRANSITIONS[st]


def test_agents_install_is_a_field_with_the_old_option_as_fallback(tmp_path: Path,
                                                                    project) -> None:
    p = plan(tmp_path, [{"id": "a", "title": "A"}], agents={"install": "cache"})
    with pytest.raises(ConfigError, match=r"plan.yaml:\d+: agents.install: Input should be "
                                          r"'auto', 'host' or 'layer'"):
        load_plan(tmp_path, p)

    def adapter_install(agents: dict, task: dict | None = None) -> object:
        project.write_plan([{"id": "a", "title": "A", "harness": "claude-code",
                             **(task or {})}], agents=agents)
        from corral.harness import AgentContext

        orch = project.orchestrator()
        t = orch.rec.task("a")
        h = orch.harness_for(t)
        return h.opts(AgentContext("a", options=t.spec.get("options") or {})).get("install")

    assert adapter_install({"install": "layer"}) == "layer"
    assert adapter_install({"options": {"install": "host"}}) == "host"  # the old spelling
    assert adapter_install({"install": "layer", "options": {"install": "host"}}) == "layer"
    assert adapter_install({"install": "layer"}, {"options": {"install": "host"}}) == "host"
    assert adapter_install({}) is None  # the adapter's default: auto
