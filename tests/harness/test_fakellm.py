"""The fake model server speaks the real wire formats: read by raw HTTP (httpx) and
by the official Anthropic and OpenAI SDKs, streamed and not."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
import trustme

from corral.errors import ConfigError
from corral.testing.fakellm import FakeLLM, Script

SCRIPT = {
    "cwd": "/work",
    "rules": [
        {"match": {"contains": "fix the bug"}, "turns": [
            {"text": "Looking.", "run": "pytest -q",
             "usage": {"input_tokens": 100, "output_tokens": 7}},
            {"write": {"path": "a.py", "content": "x = 1\n"}},
            {"text": "Fixed."}]},
        {"match": {"regex": "^CI failed"}, "turns": [{"text": "On it."}]},
        {"match": {"contains": "overloaded"}, "turns": [
            {"status": 529, "error": "busy", "headers": {"x-should-retry": "false"}}]},
    ],
    "fallback": {"text": "Nothing else."},
}
BASH = {"name": "Bash", "description": "run", "input_schema": {"type": "object"}}
EXEC = {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}


@pytest.fixture
def llm():
    with FakeLLM(SCRIPT, api_key="sk-real") as server:
        yield server


@pytest.fixture
def closer() -> Iterator[contextlib.ExitStack]:
    """Closes the SDK clients a test makes (their pooled sockets) when it ends."""
    with contextlib.ExitStack() as stack:
        yield stack


def _anthropic(closer: contextlib.ExitStack, llm: FakeLLM, key: str = "sk-real",
               retries: int = 0) -> anthropic.Anthropic:
    return closer.enter_context(anthropic.Anthropic(base_url=llm.url, api_key=key,
                                                    max_retries=retries))


def _openai(closer: contextlib.ExitStack, llm: FakeLLM) -> openai.OpenAI:
    return closer.enter_context(openai.OpenAI(base_url=f"{llm.url}/v1", api_key="sk-real",
                                              max_retries=0))


def _sse(text: str) -> list[tuple[str | None, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, None
        for ln in block.splitlines():
            if ln.startswith("event: "):
                event = ln[7:]
            elif ln.startswith("data: "):
                data = ln[6:]
        if data and data != "[DONE]":
            out.append((event, json.loads(data)))
    return out


def test_anthropic_stream_events_and_usage(llm):
    body = {"model": "claude-x", "max_tokens": 100, "stream": True, "tools": [BASH],
            "messages": [{"role": "user", "content": "please fix the bug"}]}
    r = httpx.post(f"{llm.url}/v1/messages?beta=true", json=body,
                   headers={"x-api-key": "sk-real"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    events = _sse(r.text)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 100 and start["usage"]["output_tokens"] == 1
    deltas = [d["delta"] for e, d in events if e == "content_block_delta"]
    text = "".join(d["text"] for d in deltas if d["type"] == "text_delta")
    args = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
    assert text == "Looking."
    assert json.loads(args) == {"command": "pytest -q", "description": "Run a command"}
    tool_start = [d for e, d in events if e == "content_block_start"][1]["content_block"]
    assert tool_start["type"] == "tool_use" and tool_start["name"] == "Bash"
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use" and final["usage"]["output_tokens"] == 7
    rec = llm.model_requests()[-1]
    assert rec.api_key == "sk-real" and rec.query == "beta=true" and (rec.rule, rec.turn) == (0, 0)


def test_anthropic_sdk_reads_the_stream_and_the_conversation_moves_on(llm, closer):
    client = _anthropic(closer, llm, "sk-real", 0)
    msgs = [{"role": "user", "content": "fix the bug"}]
    with client.messages.stream(model="claude-x", max_tokens=100, messages=msgs,
                                tools=[BASH]) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use" and first.usage.output_tokens == 7
    tool = next(b for b in first.content if b.type == "tool_use")
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id,
                                           "content": "1 passed"}]}]
    second = client.messages.create(model="claude-x", max_tokens=100, messages=msgs,
                                    tools=[BASH, {"name": "Write", "input_schema": {}},
                                           {"name": "Edit", "input_schema": {}},
                                           {"name": "Read", "input_schema": {}}])
    # turn 2 of the rule: Claude Code's tools, absolute paths from the script's cwd
    assert [b.name for b in second.content] == ["Read", "Write"]
    assert second.content[1].input == {"file_path": "/work/a.py", "content": "x = 1\n"}
    assert second.usage.input_tokens > 0


def test_anthropic_sdk_errors_keep_the_api_shape(llm, closer):
    bad = _anthropic(closer, llm, "sk-sentinel", 0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}])
    good = _anthropic(closer, llm, "sk-real", 3)
    with pytest.raises(anthropic.APIStatusError) as info:
        good.messages.create(model="m", max_tokens=5,
                             messages=[{"role": "user", "content": "overloaded now"}])
    assert info.value.status_code == 529 and "busy" in str(info.value)
    # x-should-retry: false is honoured by the SDK: one call, no retries
    assert [r.status for r in llm.model_requests()] == [401, 529]


def test_openai_responses_stream_with_sdk(llm, closer):
    client = _openai(closer, llm)
    stream = client.responses.create(model="gpt-x", input="fix the bug", tools=[EXEC],
                                     stream=True)
    kinds = []
    final = None
    for ev in stream:
        kinds.append(ev.type)
        if ev.type == "response.completed":
            final = ev.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_item.added" in kinds and "response.output_item.done" in kinds
    assert final is not None and final.usage.input_tokens == 100
    assert final.usage.output_tokens == 7
    items = [(i.type, getattr(i, "name", None)) for i in final.output]
    assert items == [("message", None), ("function_call", "exec_command")]
    call = final.output[1]
    assert json.loads(call.arguments) == {"cmd": "pytest -q", "workdir": "/work"}
    assert final.output_text == "Looking."


def test_openai_responses_json_counts_turns_by_model_output(llm, closer):
    client = _openai(closer, llm)
    history = [
        {"role": "user", "content": "fix the bug"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "function_call", "call_id": "c2", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c2", "output": "ok"},
    ]
    r = client.responses.create(model="gpt-x", input=history, tools=[EXEC])
    assert r.output_text == "Fixed."  # turn 3: two model turns came before
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_chat_completions_stream_ends_with_usage_chunk(llm, closer):
    client = _openai(closer, llm)
    chunks = list(client.chat.completions.create(
        model="gpt-x", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "x"},
                  {"role": "user", "content": "CI failed: test_a"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "On it."
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish == "stop"


def test_chat_completions_json_and_edit_blocks(llm, closer):
    client = _openai(closer, llm)
    msgs = [{"role": "system", "content": "Use SEARCH/REPLACE: <<<<<<< SEARCH"},
            {"role": "user", "content": "fix the bug"},
            {"role": "assistant", "content": "Looking."},
            {"role": "user", "content": "I ran it"}]
    r = client.chat.completions.create(model="gpt-x", messages=msgs)
    # no tools offered: the write comes back as an edit block for a tool-less client
    body = r.choices[0].message.content
    assert "a.py\n```\n<<<<<<< SEARCH\n=======\nx = 1\n>>>>>>> REPLACE\n```" in body
    assert r.usage.prompt_tokens > 0 and r.choices[0].finish_reason == "stop"
    # the client asking for its last answer again (Aider after adding files) replays it
    msgs += [{"role": "assistant", "content": body},
             {"role": "user", "content": "I added these files to the chat: a.py"}]
    again = client.chat.completions.create(model="gpt-x", messages=msgs)
    assert again.choices[0].message.content == body


def test_fallback_probes_and_side_requests(llm, closer):
    assert httpx.head(f"{llm.url}/").status_code == 200
    assert httpx.get(f"{llm.url}/v1/models").json()["data"][0]["id"] == "fake-model"
    n = httpx.post(f"{llm.url}/v1/messages/count_tokens", json={"messages": []}).json()
    assert n["input_tokens"] >= 1
    assert httpx.get(f"{llm.url}/nope").status_code == 404
    client = _anthropic(closer, llm, "sk-real", 0)
    # no rule matches: the fallback, a final answer
    r = client.messages.create(model="m", max_tokens=5, tools=[BASH],
                               messages=[{"role": "user", "content": "hello"}])
    assert r.content[0].text == "Nothing else." and r.stop_reason == "end_turn"
    # a tool-less side request (a title) never gets actions
    r = client.messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": "fix the bug"}])
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Looking."
    assert [x.method for x in llm.requests][:2] == ["HEAD", "GET"]


def test_https_with_a_throwaway_ca():
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with FakeLLM(SCRIPT, ssl_context=ctx) as server:
        assert server.url.startswith("https://")
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        with httpx.Client(verify=client_ctx) as client:
            r = client.post(f"{server.url}/v1/chat/completions",
                           json={"model": "m", "messages": [
                               {"role": "user", "content": "fix the bug"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_script_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"rules\.0\.turns"):
        Script.parse({"rules": [{"match": {"contains": "x"}}]})
    with pytest.raises(ConfigError, match="bad regex"):
        Script.parse({"rules": [{"match": {"regex": "("}, "turns": []}]})
    bad = tmp_path / "s.yaml"
    bad.write_text("rules:\n  - turns:\n      - {text: 1, nope: 2}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml:3: rules\.0\.turns\.0"):
        Script.load(bad)


def test_records_to_jsonl(tmp_path):
    log = tmp_path / "requests.jsonl"
    with FakeLLM({"rules": []}, record=log) as server:
        httpx.post(f"{server.url}/v1/chat/completions",
                   headers={"authorization": "Bearer sk-abc"},
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    rec = json.loads(log.read_text().splitlines()[0])
    assert rec["api"] == "chat" and rec["headers"]["authorization"] == "Bearer sk-abc"
    assert rec["usage"][0] > 0 and json.loads(rec["body"])["model"] == "m"
