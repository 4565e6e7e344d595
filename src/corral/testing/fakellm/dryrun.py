"""A dry run of a plan with a real agent CLI: the fake model stands behind
corral's proxy at the provider's own name, so the CLI, the fence, the secret
broker and the meter all work as with the real provider; only the answers are
scripted and no token is spent.

    with DryRun("claude-code", script, workdir) as dry:
        config["policy"] = dry.policy()            # allow the host, key as a secret
        config["agents"] = {"harness": "claude-code", "options": dry.agent_options()}
        ... corral run ...
        dry.llm.requests                           # what the CLI asked

The provider's name (``api.anthropic.com`` / ``api.openai.com``) resolves, in
the proxy only, to the fake server on loopback (``upstreams.resolve``), which
presents a certificate from a throwaway CA the policy trusts
(``upstreams.extra_ca``). The sandbox holds a sentinel for the API key; the
proxy swaps in the "real" key, which the fake server insists on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corral.testing.fakellm.script import Script
from corral.testing.fakellm.server import FakeLLM

#: harness -> (provider host, metering API, key variable, model)
PROVIDERS: dict[str, tuple[str, str, str, str]] = {
    "claude-code": ("api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY", "claude-sonnet-4-5"),
    "codex": ("api.openai.com", "openai", "OPENAI_API_KEY", "gpt-5.5"),
    "aider": ("api.openai.com", "openai", "OPENAI_API_KEY", "openai/gpt-4.1"),
}
#: the environment variable the policy's secret is read from during a dry run
KEY_SOURCE = "CORRAL_DRYRUN_MODEL_KEY"
DRY_KEY = "sk-corral-dry-run-not-a-real-key"


class DryRun:
    """A fake provider for ``harness``, behind the proxy (see the module docstring)."""

    def __init__(self, harness: str, script: Script, directory: Path) -> None:
        if harness not in PROVIDERS:
            from corral.errors import UsageError

            raise UsageError(f"--harness {harness!r}: one of {', '.join(PROVIDERS)}")
        from corral.security.ca import CertificateAuthority

        self.harness = harness
        self.host, self.api, self.key_var, self.model = PROVIDERS[harness]
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.create(directory / "fake-provider-ca",
                                              name="corral dry-run provider CA")
        self.ca_file = directory / "fake-provider-ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.llm = FakeLLM(script, ssl_context=self.ca.server_context(self.host),
                           api_key=DRY_KEY)

    def __enter__(self) -> DryRun:
        os.environ[KEY_SOURCE] = DRY_KEY
        self.llm.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.llm.stop()
        os.environ.pop(KEY_SOURCE, None)

    def policy(self) -> dict[str, Any]:
        """The ``policy:`` section of corral.yaml for the dry run."""
        return {
            "network": {"default": "deny", "rules": [
                {"host": self.host, "decision": "allow",
                 "reason": "the model provider (a fake one: this is a dry run)"}]},
            "secrets": {self.key_var: {"source": f"env:{KEY_SOURCE}", "hosts": [self.host]}},
            "upstreams": {"extra_ca": str(self.ca_file),
                          "resolve": {f"{self.host}:443": f"127.0.0.1:{self.llm.port}"}},
            "llm": {"hosts": {self.host: self.api}},
        }

    def agent_options(self) -> dict[str, Any]:
        """``agents.options`` for the harness (model; Aider's edit format)."""
        opts: dict[str, Any] = {"model": self.model}
        if self.harness == "aider":
            opts["edit_format"] = "diff"  # SEARCH/REPLACE: edits and appends
        return opts


def prepare_plan(harness: str, repo: Path, plan_file: Path, directory: Path) -> DryRun:
    """Turn a scripted plan into a dry run for ``harness``: a model script from the
    tasks' scripts, the plan's agents switched to the real CLI, and the policy for
    the fake provider added to the repository's corral.yaml (its working copy,
    which is what the orchestrator reads). Returns the ``DryRun``, not started."""
    import yaml

    from corral.testing.fakellm.plans import script_for_tasks

    plan = yaml.safe_load(plan_file.read_text()) or {}
    scripts: dict[str, Any] = {}
    for task in plan.get("tasks") or []:
        script = task.get("script")
        if isinstance(script, str):
            script = yaml.safe_load((plan_file.parent / script).read_text())
        if isinstance(script, dict):
            scripts[str(task["id"])] = script
    dry = DryRun(harness, script_for_tasks(scripts, split=harness != "aider"), directory)
    agents = dict(plan.get("agents") or {})
    agents.update(harness=harness, options=dry.agent_options())
    plan["agents"] = agents
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    cfg_file = repo / "corral.yaml"
    cfg = (yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else None) or {}
    cfg["policy"] = dry.policy()
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dry


def metered_by_task(run_id: str, home: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Tokens the proxy metered for each task of run ``run_id`` (all its sandboxes)."""
    from corral.compute.context import get_context
    from corral.compute.sandbox import Sandbox
    from corral.security.metering import Meter

    meter = Meter(get_context(home).store)
    out: dict[str, dict[str, int]] = {}
    for sbx in Sandbox.list(metadata={"corral.run": run_id}, include_destroyed=True,
                            home=home):
        task = sbx.metadata.get("corral.task", "?")
        t = meter.totals(sandbox_id=sbx.id)
        row = out.setdefault(task, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        row["requests"] += t.requests
        row["input_tokens"] += t.input_tokens
        row["output_tokens"] += t.output_tokens
    return out
