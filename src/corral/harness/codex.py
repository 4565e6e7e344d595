"""``codex``: OpenAI's Codex CLI, run non-interactively.

    codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox \
        --disable plugins -c analytics.enabled=false \
        -c model_provider=corral -c 'model_providers.corral={base_url=..., env_key=...,
        wire_api="responses"}' [-m MODEL] [resume SESSION] - < prompt

Codex ignores ``OPENAI_BASE_URL``; a provider of our own (``model_providers``)
names the base URL and the variable holding the key, for the real API and for
a dry run alike. It streams ``POST /v1/responses``. The prompt comes on
standard input (``-``), which also keeps Codex from waiting for more input.
Follow-ups use ``exec resume THREAD`` with the ``thread_id`` of the earlier
turn (kept under ``~/.codex`` in the sandbox).

Its own sandbox (Landlock/seccomp) cannot start inside ours and its approval
prompts have nobody to answer them, so both are bypassed; corral's sandbox and
fence are the boundary (see ``_cli``).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from corral.harness._cli import AgentCli
from corral.harness._parse_codex import CodexParser
from corral.harness.base import AgentContext, Launch, Prompt

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def v1(base: str) -> str:
    """``http://host:port`` or ``.../v1`` -> the ``.../v1`` form OpenAI clients take."""
    base = base.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class Codex(AgentCli):
    name = "codex"

    def new_parser(self) -> Any:
        return CodexParser()

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        opts = self.opts(ctx)
        pfile = self.prompt_file(ctx)
        base = v1(str(opts["base_url"])) if opts.get("base_url") else DEFAULT_BASE_URL
        provider = (f"{{name={json.dumps('corral')}, base_url={json.dumps(base)}, "
                    f"env_key={json.dumps(self.key_var(opts))}, wire_api=\"responses\"}}")
        argv = [str(self.installed(ctx).binary), "exec", "--json", "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox", "--disable", "plugins",
                "-c", "analytics.enabled=false", "-c", "model_provider=corral",
                "-c", f"model_providers.corral={provider}", "-C", ctx.workdir]
        if opts.get("model"):
            argv += ["-m", str(opts["model"])]
        argv += self.extra_args(opts)
        if session:
            argv += ["resume", session]
        argv.append("-")
        # not exec'd: after Codex exits, the wrapper reports the thread's final token
        # total, which covers a turn that failed before its turn.completed
        run = " ".join(shlex.quote(a) for a in argv) + f" < {shlex.quote(pfile)}"
        command = (_before(session) if session else "") + f"{run}; rc=$?; {_AFTER}; exit $rc"
        # no __pycache__ in the workspace: corral commits what the agent leaves there
        return Launch(command=command, files={pfile: prompt.text},
                      env={"NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1"})


_SESSIONS = '"${CODEX_HOME:-$HOME/.codex}"/sessions/*/*/*'
_AFTER = ("f=$(ls -t " + _SESSIONS + "/rollout-*.jsonl 2>/dev/null | head -n 1); "
          "if [ -n \"$f\" ]; then l=$(grep '\"total_token_usage\"' \"$f\" | tail -n 1); "
          "if [ -n \"$l\" ]; then printf '{\"corral_codex_after\": %s}\\n' \"$l\"; fi; fi")


def _before(session: str) -> str:
    """Shell that prints the thread's token total so far (its rollout's last
    ``token_count``): ``turn.completed`` after a resume counts the earlier turns too."""
    sid = shlex.quote(session)
    return ("f=$(ls " + _SESSIONS + "/rollout-*-" + sid
            + '.jsonl 2>/dev/null | tail -n 1); '
            'if [ -n "$f" ]; then l=$(grep \'"total_token_usage"\' "$f" | tail -n 1); '
            'if [ -n "$l" ]; then printf \'{"corral_codex_before": %s}\\n\' "$l"; fi; fi; ')
