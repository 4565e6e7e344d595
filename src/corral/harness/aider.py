"""``aider``: Aider, run non-interactively with ``--message-file``.

    aider --model openai/MODEL --message-file prompt --yes-always --no-pretty \
        --no-stream --no-auto-commits --no-gitignore --analytics-disable \
        --analytics-log /dev/stderr --chat-history-file ... [--restore-chat-history]

Aider calls an OpenAI-compatible Chat Completions API (``OPENAI_API_BASE``,
``--model openai/NAME``; one ``POST /v1/chat/completions`` per model turn, no
tools) and edits files from the whole-file or SEARCH/REPLACE blocks in the
answer. ``--no-stream`` makes it report the API's own token counts. It does
not run the shell commands a model suggests when told ``--yes-always`` (they
need an explicit yes); it runs ``--test-cmd`` after its edits with
``--auto-test`` (option ``test_command``) and feeds failures back to the model.

Aider has no sessions to resume; a follow-up restores the chat from its
history file in the sandbox (``--restore-chat-history``), and a fresh sandbox
starts clean with corral's prompt, which carries what happened before. Aider
cannot run git, so for a ``conflict`` the adapter resets the branch to the new
main and Aider redoes its change there (what the prompt allows: "rebase ... or
redo it there"). Its repo-map cache is kept out of commits
(``.git/info/exclude``).
corral commits the work (``agents.auto_commit``), so Aider's own commits (and
the extra model call for each commit message) are off. Update checks,
analytics and the model price list download are off
(``LITELLM_LOCAL_MODEL_COST_MAP``): the only connections are model calls.

Options besides the common ones: ``test_command``, ``edit_format`` (``whole``,
``diff``...), ``model_metadata`` (a mapping written to ``--model-metadata-file``
for models litellm does not know: context window and prices).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from corral.harness._cli import AgentCli
from corral.harness._parse_aider import AiderParser
from corral.harness.base import STATE_DIR, AgentContext, Launch, Prompt
from corral.harness.codex import v1

AIDER_DIR = f"{STATE_DIR}/aider"
CHAT_HISTORY = f"{AIDER_DIR}/chat.history.md"
INPUT_HISTORY = f"{AIDER_DIR}/input.history"
METADATA = f"{AIDER_DIR}/model-metadata.json"
TEST_SCRIPT = f"{AIDER_DIR}/test.sh"
#: Aider cannot run git: on a conflict the adapter puts the branch on the new main
#: (fetched as origin/main) and Aider redoes the change there, with its chat restored
_REDO = ("if git rev-parse -q --verify origin/main >/dev/null; then "
         "git reset -q --hard origin/main; fi")
DEFAULT_MODEL = "openai/gpt-4.1"


class Aider(AgentCli):
    name = "aider"

    def new_parser(self) -> Any:
        return AiderParser()

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        opts = self.opts(ctx)
        pfile = self.prompt_file(ctx)
        model = str(opts.get("model") or DEFAULT_MODEL)
        if "/" not in model:
            model = f"openai/{model}"
        files: dict[str, str | bytes] = {pfile: prompt.text}
        binary = self.installed(ctx).binary
        argv = [str(binary), "--model", model, "--message-file", pfile,
                "--yes-always", "--no-pretty", "--no-fancy-input", "--no-stream",
                "--no-auto-commits", "--no-dirty-commits", "--no-gitignore",
                "--no-check-update", "--no-show-release-notes", "--analytics-disable",
                "--analytics-log", "/dev/stderr", "--chat-history-file", CHAT_HISTORY,
                "--input-history-file", INPUT_HISTORY]
        if isinstance(opts.get("model_metadata"), dict):
            files[METADATA] = json.dumps({model: opts["model_metadata"]})
            argv += ["--model-metadata-file", METADATA]
        if opts.get("edit_format"):
            argv += ["--edit-format", str(opts["edit_format"])]
        if opts.get("test_command"):
            files[TEST_SCRIPT] = _test_script(str(opts["test_command"]))
            argv += ["--test-cmd", f"/bin/sh {TEST_SCRIPT}", "--auto-test"]
        if session:
            argv.append("--restore-chat-history")
        argv += self.extra_args(opts)
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1",
               "NO_COLOR": "1", "TERM": "dumb"}
        if opts.get("base_url"):
            env["OPENAI_API_BASE"] = v1(str(opts["base_url"]))
        marker = json.dumps({"corral_session": CHAT_HISTORY})
        key = self.key_var(opts)
        # Aider reopens /dev/stderr for its analytics log: that works on a pipe the
        # sandbox made (the command's own output file belongs to the host), hence
        # the process substitution, and the wait for its last lines
        prices = (f"{shlex.quote(str(binary.parent.parent))}/lib/python3*/site-packages/litellm/"
                  "model_prices_and_context_window_backup.json")
        parts = [
            f"mkdir -p {AIDER_DIR} && printf '%s\\n' {shlex.quote(marker)} || exit 1",
            # its repo-map cache (.aider.tags.cache*) must not be committed
            "if [ -d .git/info ] && ! grep -qxF '.aider*' .git/info/exclude 2>/dev/null; "
            "then echo '.aider*' >> .git/info/exclude; fi",
            # Aider downloads litellm's price list unless its cache holds one: seed the
            # cache from the copy litellm ships (the download would be denied anyway)
            'c="$HOME/.aider/caches/model_prices_and_context_window.json"; '
            '[ -s "$c" ] || { mkdir -p "${c%/*}" && cp ' + prices + ' "$c"; } 2>/dev/null',
        ]
        if prompt.reaction == "conflict":
            parts.append(_REDO)
        if key != "OPENAI_API_KEY":
            parts.append(f'export OPENAI_API_KEY="${{{key}}}"')
        parts.append(" ".join(shlex.quote(a) for a in argv)
                     + " 2> >(cat >&2); rc=$?; wait $! 2>/dev/null; exit $rc")
        command = "; ".join(parts)
        return Launch(command=command, files=files, env=env)


def _test_script(command: str) -> str:
    """The ``--test-cmd`` wrapper: runs ``command`` and prints one JSON line with
    its exit status (Aider prints neither the command nor its status)."""
    cmd_json = json.dumps(command)
    return (f"{command}\nrc=$?\n"
            f"printf '{{\"corral_command\": %s, \"exit_code\": %d}}\\n' "
            f"{shlex.quote(cmd_json)} \"$rc\"\nexit $rc\n")
