"""The model script: what the fake model answers, turn after turn.

A script is a list of *rules*. Each rule matches a user prompt (by substring or
regex) and lists the turns the model plays from that prompt on::

    cwd: /workspace                  # where relative paths in actions resolve
    rules:
      - match: {contains: "Add the /v2/users endpoint"}
        turns:
          - text: "Writing the endpoint."
            write: {path: api.py, content: "def users(): ...\\n"}
          - run: "python -m pytest -q"
          - text: "Done: the endpoint exists and the tests pass."
      - match: {contains: "CI failed"}
        turns:
          - edit: {path: api.py, old: "...", new: "..."}
          - text: "Fixed."
    fallback: {text: "Nothing left to do."}

Choosing a turn is stateless, so retries, parallel sessions and resumed
sessions all get the right answer: the server walks the request's user prompts
from the newest back, takes the first one some rule matches, and plays that
rule's turn number N, where N is how many assistant messages the request holds
after that prompt. Past a rule's last turn, and when no rule matches, the
``fallback`` turn (a plain final answer) is played, so an agent always stops.

Actions (``write``, ``append``, ``edit``, ``run``) are harness-neutral: the server turns them
into whatever the calling CLI understands: a ``Write`` / ``Edit`` / ``Bash`` tool
call for Claude Code, ``exec_command`` / ``apply_patch`` for Codex, and edit
blocks in the text for tool-less clients such as Aider. Raw ``tool_calls`` are
passed through unchanged for anything else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corral.errors import ConfigError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Model):
    """What a user prompt must contain for a rule to apply (all given fields)."""

    contains: str | None = None
    #: searched with ``re.MULTILINE``: ``^`` matches at the start of any line (clients
    #: put their own text blocks before the prompt in the same message)
    regex: str | None = None
    #: only requests of this API (anthropic | responses | chat)
    api: Literal["anthropic", "responses", "chat"] | None = None
    #: only requests for a model whose name contains this
    model: str | None = None

    @model_validator(mode="after")
    def _compiles(self) -> Match:
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex {self.regex!r}: {exc}") from None
        return self


class Write(_Model):
    path: str
    content: str


class Append(_Model):
    path: str
    content: str


class Edit(_Model):
    path: str
    old: str
    new: str


class ToolCall(_Model):
    """A raw tool call, sent as is (the client must offer a tool of that name)."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Step(_Model):
    """One action of an ordered ``do`` list (exactly one key)."""

    write: Write | None = None
    append: Append | None = None
    edit: Edit | None = None
    run: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        if sum(x is not None for x in (self.write, self.append, self.edit, self.run)) != 1:
            raise ValueError("a step has exactly one of write, append, edit, run")
        return self

    def action(self) -> Write | Append | Edit | str:
        out = self.write or self.append or self.edit or self.run
        assert out is not None
        return out


class Usage(_Model):
    """Token usage the reply reports; unset fields are estimated (bytes / 4)."""

    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)


class Turn(_Model):
    """One model reply: optional text, then actions (as tool calls or edit blocks)."""

    text: str | None = None
    write: Write | list[Write] | None = None
    append: Append | list[Append] | None = None
    edit: Edit | list[Edit] | None = None
    run: str | list[str] | None = None
    #: actions in this exact order (after the grouped ones above)
    do: list[Step] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    #: answer with this HTTP error status instead (429, 500, 529...)
    status: int | None = Field(default=None, ge=400, le=599)
    error: str | None = None
    #: the error's ``type`` (``billing_error``, ``insufficient_quota``...); else by status
    error_type: str | None = None
    #: the whole error body, sent as is (instead of one built from the fields above)
    error_body: dict[str, Any] | None = None
    #: extra response headers of an error (``x-should-retry: "false"``)
    headers: dict[str, str] = Field(default_factory=dict)
    #: seconds to wait before answering (headers included)
    delay: float = Field(default=0.0, ge=0)

    def actions(self) -> list[Write | Append | Edit | str | ToolCall]:
        """The turn's actions in order: writes, appends, edits, commands, raw tool calls."""
        out: list[Write | Append | Edit | str | ToolCall] = []
        for group in (self.write, self.append, self.edit, self.run):
            if group is None:
                continue
            out.extend(group if isinstance(group, list) else [group])
        out.extend(step.action() for step in self.do)
        out.extend(self.tool_calls)
        return out


class Rule(_Model):
    match: Match = Field(default_factory=Match)
    turns: list[Turn]


class Script(_Model):
    """A whole model script; see the module docstring."""

    rules: list[Rule] = Field(default_factory=list)
    fallback: Turn = Field(default_factory=lambda: Turn(text="Done."))
    #: the working directory relative action paths resolve against, when the
    #: request does not say (Claude Code and Codex tell it in their prompts)
    cwd: str = "/workspace"
    #: the answer to requests that offer no tools where tools are the norm
    #: (Claude Code's side requests: titles, summaries)
    side_text: str = "OK"
    #: user messages that ask the model to play its last turn again rather than
    #: go on (Aider, after adding the files an answer named to the chat)
    replay: list[str] = Field(default_factory=lambda: ["I added these files to the chat"])

    @classmethod
    def load(cls, path: str | Path) -> Script:
        """Read a script from YAML or JSON; raises ``ConfigError`` naming the file."""
        from corral.config import format_validation_error, load_yaml

        p = Path(path)
        data, lines = load_yaml(p)
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(p), lines)) from None

    @classmethod
    def parse(cls, data: str | dict[str, Any]) -> Script:
        """From a YAML string or a dict; raises ``ConfigError``."""
        if isinstance(data, str):
            try:
                data = yaml.safe_load(data) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"model script: invalid YAML: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"model script: {loc}: {err['msg']}") from None

    def choose(self, prompts: list[tuple[str, int]], api: str, model: str) -> Choice:
        """The turn for a request whose user prompts are ``prompts`` (oldest first,
        each with the number of assistant messages after it)."""
        for pos in range(len(prompts) - 1, -1, -1):
            text, after = prompts[pos]
            for idx, rule in enumerate(self.rules):
                if _matches(rule.match, text, api, model):
                    if after < len(rule.turns):
                        return Choice(rule.turns[after], rule=idx, turn=after)
                    return Choice(self.fallback, rule=idx, turn=None)
        return Choice(self.fallback, rule=None, turn=None)


class Choice:
    """The turn chosen for one request, and where it came from (for the record)."""

    __slots__ = ("rule", "turn", "value")

    def __init__(self, value: Turn, rule: int | None, turn: int | None) -> None:
        self.value = value
        self.rule = rule
        self.turn = turn


def _matches(m: Match, text: str, api: str, model: str) -> bool:
    if m.api is not None and m.api != api:
        return False
    if m.model is not None and m.model not in model:
        return False
    if m.contains is not None and m.contains not in text:
        return False
    return not (m.regex is not None and re.search(m.regex, text, re.MULTILINE) is None)
