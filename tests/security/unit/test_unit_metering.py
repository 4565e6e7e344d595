"""Token usage from real wire formats (JSON and SSE, chunked and compressed), and the meter."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.metering import (
    Meter,
    SSEDecoder,
    cost_of,
    is_model_call,
    parser_for,
    refusal_response,
)
from corral.security.policy import LlmPolicy, Price
from corral.security.types import Usage
from corral.store import Store

WIRE = Path(__file__).parent / "llm"

# fixture file, (api, path, content type), the usage it must yield
CASES = {
    "anthropic_stream.sse": (("anthropic", "/v1/messages", "text/event-stream"),
                             Usage(472, 15, 2048, 120, "claude-sonnet-4-20250514",
                                   "anthropic")),
    "anthropic.json": (("anthropic", "/v1/messages", "application/json"),
                       Usage(2095, 503, 0, 0, "claude-3-5-haiku-20241022", "anthropic")),
    "openai_chat_stream.sse": (("openai", "/v1/chat/completions", "text/event-stream"),
                               Usage(176, 30, 1024, 0, "gpt-4o-mini-2024-07-18", "openai")),
    "openai_chat.json": (("openai", "/v1/chat/completions", "application/json"),
                         Usage(19, 10, 0, 0, "gpt-4.1-2025-04-14", "openai")),
    "openai_responses_stream.sse": (("openai", "/v1/responses", "text/event-stream"),
                                    Usage(37, 11, 0, 0, "gpt-4.1-2025-04-14", "openai")),
    "openai_responses.json": (("openai", "/v1/responses", "application/json; charset=utf-8"),
                              Usage(500, 812, 1536, 0, "o4-mini-2025-04-16", "openai")),
}


def run(name: str, chunks: list[bytes], *, encoding: str | None = None,
        content_type: str | None = "") -> Usage | None:
    (api, path, ct), _ = CASES[name]
    p = parser_for(api, "h.test", "POST", path, ct if content_type == "" else content_type,
                   encoding)
    assert p is not None
    for c in chunks:
        p.feed(c)
    return p.usage()


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_bodies(name: str) -> None:
    assert run(name, [(WIRE / name).read_bytes()]) == CASES[name][1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_content_type_sniffed_when_missing(name: str) -> None:
    assert run(name, [(WIRE / name).read_bytes()], content_type=None) == CASES[name][1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_crlf_line_endings(name: str) -> None:
    body = (WIRE / name).read_bytes().replace(b"\n", b"\r\n")
    assert run(name, [body[i:i + 7] for i in range(0, len(body), 7)]) == CASES[name][1]


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for c in cuts:
        out.append(body[pos:pos + c])
        pos += c
    out.append(body[pos:])
    return out


@given(st.sampled_from(sorted(CASES)), st.lists(st.integers(0, 300), max_size=25))
@settings(max_examples=400, deadline=None)
def test_any_chunking(name: str, cuts: list[int]) -> None:
    body = (WIRE / name).read_bytes()
    assert run(name, _split(body, cuts)) == CASES[name][1]


@given(st.sampled_from(sorted(CASES)), st.sampled_from(["gzip", "deflate"]),
       st.lists(st.integers(0, 100), max_size=10))
@settings(max_examples=150, deadline=None)
def test_compressed_bodies(name: str, encoding: str, cuts: list[int]) -> None:
    raw = (WIRE / name).read_bytes()
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    assert run(name, _split(body, cuts), encoding=encoding) == CASES[name][1]


def test_unreadable_and_unmetered() -> None:
    body = (WIRE / "anthropic.json").read_bytes()
    assert run("anthropic.json", [body], encoding="br") is None
    assert run("anthropic.json", [b"\x00garbage"], encoding="gzip") is None
    assert run("anthropic.json", [b"{not json"]) is None
    assert run("anthropic.json", []) is None
    assert run("anthropic.json", [(WIRE / "anthropic_error.json").read_bytes()]) is None
    # a chat stream without the usage chunk (the client did not ask for it)
    stream = (WIRE / "openai_chat_stream.sse").read_text().split("\n\n")
    no_usage = "\n\n".join(s for s in stream if '"usage":{' not in s)
    assert run("openai_chat_stream.sse", [no_usage.encode()]) is None
    llm = LlmPolicy()
    assert parser_for(llm, "api.anthropic.com", "GET", "/v1/messages", None) is None
    assert parser_for(llm, "api.anthropic.com", "POST", "/v1/models", None) is None
    assert parser_for(llm, "example.test", "POST", "/v1/messages", None) is None
    assert is_model_call(llm, "api.openai.com", "POST", "/v1/responses")
    assert not is_model_call(llm, "api.openai.com", "POST", "/v1/files")


def test_the_text_of_a_message_cannot_fake_usage() -> None:
    # the anthropic fixture's text contains a fake "usage" object: it must not count
    u = run("anthropic_stream.sse", [(WIRE / "anthropic_stream.sse").read_bytes()])
    assert u is not None and u.output_tokens == 15


def test_sse_decoder_details() -> None:
    d = SSEDecoder()
    assert d.feed(b": comment\nevent: a\ndata: 1\ndata:2\n\n") == [("a", "1\n2")]
    assert d.feed(b"data: x\r") == []
    assert d.feed(b"\n\r\n") == [("message", "x")]
    assert d.feed(b"data: tail") == []
    assert d.flush() == [("message", "tail")]


# -- the meter ----------------------------------------------------------------------

PRICES = {"claude-sonnet-4*": Price(input=3, output=15, cache_read=0.3, cache_write=3.75),
          "gpt-4.1*": Price(input=2, output=8)}


def test_cost() -> None:
    u = Usage(1_000_000, 100_000, 2_000_000, 0, "claude-sonnet-4-20250514")
    assert cost_of(u, PRICES) == pytest.approx(3 + 1.5 + 0.6)
    assert cost_of(Usage(10, 10, model="unknown"), PRICES) is None
    exact = {"gpt-4.1": Price(input=1, output=1), "gpt-4.1*": Price(input=9, output=9)}
    assert cost_of(Usage(1_000_000, 0, model="gpt-4.1"), exact) == 1
    assert cost_of(Usage(1_000_000, 0, model="gpt-4.1-mini"), exact) == 9


def test_meter_records_and_limits(store: Store, audit) -> None:
    meter = Meter(store, audit)
    llm = LlmPolicy(token_limit=1000)
    assert meter.check("sb-1", llm) is None
    assert meter.record("sb-1", None) is None
    meter.record("sb-1", Usage(400, 100, 50, 0, "gpt-4.1", "openai"), task_id="T-1",
                 prices=PRICES)
    meter.record("sb-2", Usage(900, 0, model="x"), task_id="T-1")
    t = meter.totals(sandbox_id="sb-1")
    assert (t.requests, t.tokens, t.cache_read_tokens) == (1, 500, 50)
    assert t.cost == pytest.approx((400 * 2 + 100 * 8 + 50 * 2) / 1e6)
    assert meter.totals(task_id="T-1").tokens == 1400
    assert meter.totals(task_id="T-1").unpriced == 1
    assert meter.check("sb-1", llm) is None
    meter.record("sb-1", Usage(0, 500, model="gpt-4.1"), prices=PRICES)
    msg = meter.check("sb-1", llm)
    assert msg and "1000" in msg and "token_limit" in msg
    assert meter.check("sb-3", llm) is None
    costly = LlmPolicy(cost_limit=0.001, prices=PRICES)
    assert "cost_limit" in (meter.check("sb-1", costly) or "")
    assert Meter(store).totals(sandbox_id="sb-1").requests == 2  # another handle, same store
    recs = [r for r in audit.records() if r.event == "llm.usage"]
    assert len(recs) == 3 and recs[0].details["model"] == "gpt-4.1"
    assert recs[0].task == "T-1" and recs[0].details["input_tokens"] == 400


@pytest.mark.parametrize("api", ["anthropic", "openai", None])
def test_refusal_response(api) -> None:
    status, headers, body = refusal_response(api, "over the limit")
    assert status == 429
    h = dict(headers)
    assert h["x-should-retry"] == "false" and int(h["content-length"]) == len(body)
    assert "over the limit" in json.dumps(json.loads(body))
    if api == "anthropic":
        assert json.loads(body)["error"]["type"] == "rate_limit_error"
    if api == "openai":
        assert json.loads(body)["error"]["message"] == "over the limit"


def test_sandbox_limits_refuse_at_the_lower_limit_and_name_the_budget(store: Store) -> None:
    meter = Meter(store)
    assert meter.limit("sb-1") is None
    meter.set_limit("sb-1", tokens=600, task_id="T-1",
                    token_label="the task's token budget (budgets.task_tokens: 600)")
    meter.record("sb-1", Usage(300, 200, model="m"))
    none = LlmPolicy()
    assert meter.check("sb-1", none) is None  # 500 < 600
    meter.record("sb-1", Usage(100, 0, model="m"))
    msg = meter.check("sb-1", none)
    assert msg and "the task's token budget (budgets.task_tokens: 600) is spent" in msg
    assert "600 model tokens" in msg
    # the policy's limit, when lower, is the one named
    meter.set_limit("sb-1", tokens=10_000)
    msg = meter.check("sb-1", LlmPolicy(token_limit=550))
    assert msg and "llm.token_limit" in msg and "550" in msg
    lim = meter.limit("sb-1")
    assert lim is not None and lim.tokens == 10_000 and lim.refusals == 2
    assert lim.last_refusal == msg
    # lifted: no refusal, and the refusals stay counted
    meter.set_limit("sb-1")
    assert meter.check("sb-1", none) is None
    assert meter.limit("sb-1").refusals == 2  # type: ignore[union-attr]
    # money: the sandbox's own limit
    meter.set_limit("sb-2", usd=0.001, usd_label="the run's money budget")
    meter.record("sb-2", Usage(1000, 0, model="gpt-4.1"), prices=PRICES)
    assert "the run's money budget is spent" in (meter.check("sb-2", none) or "")
    # a refusal under the policy's limit alone is counted too (a row is made for it)
    meter.record("sb-3", Usage(10, 0, model="m"))
    assert meter.check("sb-3", LlmPolicy(token_limit=5))
    assert meter.limit("sb-3").refusals == 1  # type: ignore[union-attr]


def test_take_hands_out_each_usage_record_once(store: Store) -> None:
    meter = Meter(store)
    assert meter.take("sb-1").requests == 0
    meter.record("sb-1", Usage(100, 50, model="gpt-4.1"), prices=PRICES)
    meter.record("sb-2", Usage(7, 0, model="m"))
    got = meter.take("sb-1")
    assert (got.requests, got.tokens) == (1, 150)
    assert got.cost == pytest.approx((100 * 2 + 50 * 8) / 1e6)
    assert meter.take("sb-1").requests == 0
    meter.set_limit("sb-1", tokens=5)  # setting limits keeps the place
    meter.record("sb-1", Usage(1, 2, model="m"))
    meter.record("sb-1", Usage(3, 4, model="m"))
    # another handle (another process, a restarted orchestrator) carries on
    assert Meter(store).take("sb-1").tokens == 10
    assert meter.take("sb-1").tokens == 0
    assert meter.take("sb-2").tokens == 7
    assert meter.totals(sandbox_id="sb-1").tokens == 160  # the totals are unchanged
