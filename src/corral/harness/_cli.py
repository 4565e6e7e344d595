"""What the three real agent CLI adapters share: options, finding the installed
CLI, checking the sandbox can run it, and the prompt file.

Options come from ``agents.options`` in corral.yaml, overridden per task by the
task's ``options``:

``model``
    the model name the CLI asks for (default: the CLI's own default).
``base_url``
    the model API's base URL (default: the provider's public endpoint). For a
    dry run, the URL of ``corral fakellm serve``.
``api_key_env``
    the variable inside the sandbox that holds the API key (default
    ``ANTHROPIC_API_KEY`` or ``OPENAI_API_KEY``). In a fenced sandbox its value
    is the secret's sentinel; the proxy swaps in the real key.
``install``
    ``auto`` (default: the pinned version from corral's cache, installed on
    first use), ``host`` (the copy on the host's PATH) or ``layer`` (installed
    into the environment's prebuild, see ``install.layer_commands``). Set as
    ``agents.install`` in corral.yaml (the orchestrator passes it here); the
    option itself is still read when that is unset, and a task's ``options``
    may override it.
``args``
    extra command-line arguments, a list.

Each adapter turns its CLI's own permission prompts and own sandbox off:
corral's sandbox (namespaces, a read-only host, a private workspace) and fence
(the proxy is the only way out, secrets stay outside) are the boundary, and a
second sandbox inside ours either cannot start (it needs namespaces we do not
grant) or only adds prompts nobody is there to answer.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from corral.errors import ConfigError, MissingTool
from corral.harness.base import STATE_DIR, AgentContext, Harness, Launch, Prompt, Turn
from corral.harness.events import Event
from corral.harness.install import Installed, resolve

if TYPE_CHECKING:
    from corral.compute.sandbox import Sandbox

INSTALL_MODES = ("auto", "host", "layer")


class AgentCli(Harness):
    """Base of the ``claude-code``, ``codex`` and ``aider`` adapters."""

    #: the default variable holding the API key
    key_env: ClassVar[str] = "OPENAI_API_KEY"
    #: each CLI's output carries the API's own token counts (see the parsers)
    reports_usage: ClassVar[bool] = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._installed: dict[str, Installed] = {}
        self._lock = threading.Lock()
        self._parser = self.new_parser()
        mode = str(self.options.get("install") or "auto")
        if mode not in INSTALL_MODES:
            raise ConfigError(f"agents.install: one of {', '.join(INSTALL_MODES)}, "
                              f"not {mode!r}")

    # -- for subclasses ----------------------------------------------------------------
    def new_parser(self) -> Any:
        """A parser object with ``feed(line, stream) -> list[Event]``."""
        raise NotImplementedError

    def parse(self, line: str, stream: str) -> list[Event]:
        events: list[Event] = self._parser.feed(line, stream)
        return events

    # every turn reads its output with a parser of its own: one adapter serves many
    # tasks at once, and a parser keeps state within a run (tool calls waiting for
    # their results, usage already reported)
    def start(self, sbx: Sandbox, ctx: AgentContext, prompt: Prompt) -> Turn:
        return _own(self, super().start(sbx, ctx, prompt))

    def follow_up(self, sbx: Sandbox, ctx: AgentContext, prompt: Prompt,
                  session: str | None) -> Turn:
        return _own(self, super().follow_up(sbx, ctx, prompt, session))

    def attach(self, sbx: Sandbox, command_id: str) -> Turn:
        return _own(self, super().attach(sbx, command_id))

    # -- shared ------------------------------------------------------------------------
    def opts(self, ctx: AgentContext) -> dict[str, Any]:
        return {**self.options, **dict(ctx.options)}

    def installed(self, ctx: AgentContext | None = None) -> Installed:
        """The copy of the CLI this adapter runs (installing it on first use)."""
        opts = self.opts(ctx) if ctx else self.options
        mode = str(opts.get("install") or "auto")
        if mode not in INSTALL_MODES:
            raise ConfigError(f"agents.install: one of {', '.join(INSTALL_MODES)}, "
                              f"not {mode!r}")
        with self._lock:
            if mode not in self._installed:
                self._installed[mode] = resolve(self.name, mode)
            return self._installed[mode]

    def setup(self, sbx: Sandbox, ctx: AgentContext) -> None:
        """Make sure the CLI is installed and that the sandbox can run it."""
        inst = self.installed(ctx)
        r = sbx.commands.run(["test", "-x", str(inst.binary)], timeout=30)
        if r.exit_code != 0:
            hint = ("expose the agent cache to the environment (environment.expose: "
                    f"[{inst.prefix}]) or use agents.install: layer"
                    if inst.source == "cache" else
                    "install it in the environment's setup (agents.install: layer "
                    "installs it into the prebuild)")
            raise MissingTool(f"{self.name}: {inst.binary} is not visible inside the sandbox; "
                              f"{hint}", sandbox_id=sbx.id)

    def extra_args(self, opts: Mapping[str, Any]) -> list[str]:
        args = opts.get("args") or []
        if isinstance(args, str):
            return shlex.split(args)
        if not isinstance(args, list):
            raise ConfigError(f"agents.options.args: a list of arguments, not {args!r}")
        return [str(a) for a in args]

    def key_var(self, opts: Mapping[str, Any]) -> str:
        return str(opts.get("api_key_env") or self.key_env)

    @staticmethod
    def prompt_file(ctx: AgentContext) -> str:
        return f"{STATE_DIR}/prompt-{ctx.turn}.txt"

    @staticmethod
    def shell(argv: list[str], *, stdin: str | None = None,
              env_from: Mapping[str, str] | None = None) -> str:
        """``exec argv`` as one shell line; ``env_from`` copies variables by name
        (``{"ANTHROPIC_API_KEY": "MY_KEY"}``) without the value ever being in the line."""
        line = "exec " + " ".join(shlex.quote(a) for a in argv)
        if stdin:
            line += f" < {shlex.quote(stdin)}"
        pre = " ".join(f'{k}="${{{v}}}"' for k, v in (env_from or {}).items() if k != v)
        return f"export {pre}; {line}" if pre else line


class _TurnView(Harness):
    """The adapter as one turn sees it: the same launch, a parser of its own."""

    def __init__(self, owner: AgentCli) -> None:
        super().__init__(owner.options)
        self.owner = owner
        self._parser = owner.new_parser()

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        return self.owner.launch(ctx, prompt, session)

    def parse(self, line: str, stream: str) -> list[Event]:
        events: list[Event] = self._parser.feed(line, stream)
        return events


def _own(owner: AgentCli, turn: Turn) -> Turn:
    turn.harness = _TurnView(owner)
    return turn
