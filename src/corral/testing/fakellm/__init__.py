"""A fake model provider that speaks the real wire formats, for tests and dry runs.

Anthropic Messages, OpenAI Responses and OpenAI Chat Completions, streamed and
not, driven by a model script (``Script``) and recording every request
(``FakeLLM.requests``). See ``script.py`` for the script format and
``docs/harness.md`` for using it with the real agent CLIs.
"""

from corral.testing.fakellm.script import (
    Append,
    Edit,
    Match,
    Rule,
    Script,
    ToolCall,
    Turn,
    Usage,
    Write,
)
from corral.testing.fakellm.server import FakeLLM, RecordedRequest

__all__ = ["Append", "Edit", "FakeLLM", "Match", "RecordedRequest", "Rule", "Script",
           "ToolCall", "Turn", "Usage", "Write"]
