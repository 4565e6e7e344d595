"""LLM metering: read token usage out of model API responses the proxy forwards.

    parser = parser_for(engine.policy.llm, host, method, path, content_type, encoding)
    for chunk in response_body: parser.feed(chunk)        # as it streams to the client
    meter.record(sandbox_id, parser.usage(), task_id=..., prices=policy.llm.prices)
    refusal = meter.check(sandbox_id, policy.llm)        # before forwarding a model call
    if refusal: status, headers, body = refusal_response(api, refusal)   # a 429

Parsers take the body exactly as it came from upstream: plain or compressed
with ``gzip``/``deflate`` (decompressed here). Other encodings (``br``,
``zstd``) are not read, so the proxy should offer upstream only
``Accept-Encoding: gzip, identity`` for metered hosts. Both plain JSON and
server-sent events are understood, however the events are split into chunks.
OpenAI chat streams carry usage only when the client asked for it
(``stream_options.include_usage``); without it ``usage()`` is None.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select

from corral.security.audit import AuditLog
from corral.security.policy import LlmPolicy, Price, host_matches
from corral.security.types import Usage
from corral.store import Store
from corral.store.security_models import UsageRow

__all__ = [
    "AnthropicParser",
    "Meter",
    "OpenAIChatParser",
    "OpenAIResponsesParser",
    "SSEDecoder",
    "Totals",
    "api_for_host",
    "cost_of",
    "parser_for",
    "refusal_response",
]

Api = Literal["anthropic", "openai"]
MAX_BODY = 64 << 20


class SSEDecoder:
    """Server-sent events from arbitrary chunks -> ``(event, data)`` pairs."""

    def __init__(self, max_event: int = 16 << 20) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._max = max_event
        self.overflow = False

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        buf = self._buf + data
        # a lone CR at the end may be the first half of CRLF: keep it for the next chunk
        keep_cr = buf.endswith(b"\r")
        if keep_cr:
            buf = buf[:-1]
        buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = buf.split(b"\n")
        self._buf = rest + (b"\r" if keep_cr else b"")
        if len(self._buf) > self._max:
            self.overflow, self._buf = True, b""
        return self._lines(lines)

    def flush(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf.rstrip(b"\r"), b""
        return self._lines([rest, b""] if rest else [b""])

    def _lines(self, lines: list[bytes]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                if self._data:
                    out.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data, self._size = "", [], 0
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._size += len(value)
                if self._size > self._max:
                    self.overflow, self._data = True, []
                else:
                    self._data.append(value)
            elif name == "event":
                self._event = value
        return out


class _Parser:
    """Common part: decompression, JSON vs SSE, size limits."""

    provider: str = ""

    def __init__(self, content_type: str | None = None,
                 content_encoding: str | None = None) -> None:
        enc = (content_encoding or "identity").strip().lower()
        self._inflate = zlib.decompressobj(47) if enc in ("gzip", "x-gzip", "deflate") else None
        self.readable = enc in ("gzip", "x-gzip", "deflate", "identity", "")
        ct = (content_type or "").split(";")[0].strip().lower()
        self._mode: str | None = ("sse" if ct == "text/event-stream" else
                                  "json" if ct.endswith("json") else None)
        self._json = bytearray()
        self._sse = SSEDecoder()
        self._fields: dict[str, int] = {}
        self._model: str | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        if not self.readable or not data:
            return
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data)
            except zlib.error:
                self.readable = False
                return
        if self._mode is None:
            head = data.lstrip()
            if not head:
                return
            self._mode = "json" if head[:1] in (b"{", b"[") else "sse"
        if self._mode == "json":
            if len(self._json) + len(data) > MAX_BODY:
                self.readable = False
                return
            self._json += data
        else:
            for event, payload in self._sse.feed(data):
                self._on_event(event, payload)

    def usage(self) -> Usage | None:
        """The usage read so far (complete once the body has been fed)."""
        if not self.readable:
            return None
        if self._mode == "json" and not self._done:
            self._done = True
            try:
                obj = json.loads(bytes(self._json))
            except (ValueError, UnicodeDecodeError):
                return None
            if isinstance(obj, dict):
                self._on_json(obj)
        elif self._mode == "sse" and not self._done:
            self._done = True
            for event, payload in self._sse.flush():
                self._on_event(event, payload)
        if not self._fields:
            return None
        return Usage(input_tokens=self._fields.get("input", 0),
                     output_tokens=self._fields.get("output", 0),
                     cache_read_tokens=self._fields.get("cache_read", 0),
                     cache_write_tokens=self._fields.get("cache_write", 0),
                     model=self._model, provider=self.provider)

    def _on_event(self, event: str, payload: str) -> None:
        if payload.strip() == "[DONE]":
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if isinstance(obj, dict):
            self._on_sse(event, obj)

    def _on_json(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_sse(self, event: str, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def _set(self, key: str, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self._fields[key] = value

    def _set_model(self, obj: Mapping[str, Any]) -> None:
        m = obj.get("model")
        if isinstance(m, str) and m:
            self._model = m[:128]


def _d(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


class AnthropicParser(_Parser):
    """Anthropic Messages: JSON ``usage``; SSE ``message_start`` + ``message_delta``."""

    provider = "anthropic"

    def _anthropic(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self._set("input", usage.get("input_tokens"))
        self._set("output", usage.get("output_tokens"))
        self._set("cache_read", usage.get("cache_read_input_tokens"))
        self._set("cache_write", usage.get("cache_creation_input_tokens"))

    def _on_json(self, obj: dict[str, Any]) -> None:
        if obj.get("type") == "error":
            return
        self._set_model(obj)
        self._anthropic(obj.get("usage"))

    def _on_sse(self, event: str, obj: dict[str, Any]) -> None:
        kind = obj.get("type", event)
        if kind == "message_start":
            msg = obj.get("message") or {}
            if isinstance(msg, dict):
                self._set_model(msg)
                self._anthropic(msg.get("usage"))
        elif kind == "message_delta":
            # cumulative counts: later events replace earlier ones
            self._anthropic(obj.get("usage"))


class _OpenAIUsage(_Parser):
    provider = "openai"

    def _openai(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        inp = usage.get("input_tokens", usage.get("prompt_tokens"))
        out = usage.get("output_tokens", usage.get("completion_tokens"))
        cached = (_d(usage, "input_tokens_details", "cached_tokens")
                  or _d(usage, "prompt_tokens_details", "cached_tokens") or 0)
        if not isinstance(cached, int) or cached < 0:
            cached = 0
        if isinstance(inp, int) and not isinstance(inp, bool):
            self._set("input", max(inp - cached, 0))
            self._set("cache_read", cached)
        self._set("output", out)


class OpenAIChatParser(_OpenAIUsage):
    """OpenAI Chat Completions: JSON ``usage``; SSE chunks, usage in the last one."""

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._set_model(obj)
        self._openai(obj.get("usage"))

    def _on_sse(self, event: str, obj: dict[str, Any]) -> None:
        self._set_model(obj)
        if obj.get("usage"):
            self._openai(obj["usage"])


class OpenAIResponsesParser(_OpenAIUsage):
    """OpenAI Responses: JSON ``usage``; SSE ``response.completed`` (or incomplete/failed)."""

    def _on_json(self, obj: dict[str, Any]) -> None:
        self._set_model(obj)
        self._openai(obj.get("usage"))

    def _on_sse(self, event: str, obj: dict[str, Any]) -> None:
        kind = obj.get("type", event)
        resp = obj.get("response")
        if isinstance(resp, dict):
            self._set_model(resp)
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self._openai(resp.get("usage"))


def api_for_host(llm: LlmPolicy, host: str) -> Api | None:
    """Which model API ``host`` speaks according to ``llm.hosts`` (None: not metered)."""
    for pattern, api in llm.hosts.items():
        if host_matches(pattern, host):
            return api
    return None


def parser_for(llm: LlmPolicy | Api | None, host: str, method: str, path: str,
               content_type: str | None, content_encoding: str | None = None
               ) -> _Parser | None:
    """A usage parser for one response, or None when it is not a metered model call.

    ``llm`` is the policy's section (the host picks the API) or the API itself."""
    api = api_for_host(llm, host) if isinstance(llm, LlmPolicy) else llm
    if api is None or method.upper() != "POST":
        return None
    if api == "anthropic" and path.endswith("/messages"):
        return AnthropicParser(content_type, content_encoding)
    if api == "openai":
        if path.endswith("/chat/completions") or path.endswith("/completions"):
            return OpenAIChatParser(content_type, content_encoding)
        if path.endswith("/responses"):
            return OpenAIResponsesParser(content_type, content_encoding)
    return None


def is_model_call(llm: LlmPolicy, host: str, method: str, path: str) -> bool:
    """Whether a request is a metered model call (so a limit may refuse it)."""
    return parser_for(llm, host, method, path, "application/json") is not None


# -- the meter ------------------------------------------------------------------


def _price_for(model: str | None, prices: Mapping[str, Price]) -> Price | None:
    if not model:
        return None
    if model in prices:
        return prices[model]
    best: tuple[int, Price] | None = None
    for pattern, price in prices.items():
        rx = "".join(".*" if p == "*" else re.escape(p) for p in re.split(r"(\*)", pattern))
        if re.fullmatch(rx, model) and (best is None or len(pattern) > best[0]):
            best = (len(pattern), price)
    return best[1] if best else None


def cost_of(usage: Usage, prices: Mapping[str, Price]) -> float | None:
    """USD for ``usage`` at the price of its model (None when no price matches)."""
    p = _price_for(usage.model, prices)
    if p is None:
        return None
    cr = p.cache_read if p.cache_read is not None else p.input
    cw = p.cache_write if p.cache_write is not None else p.input
    return (usage.input_tokens * p.input + usage.output_tokens * p.output
            + usage.cache_read_tokens * cr + usage.cache_write_tokens * cw) / 1_000_000


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost: float = 0.0
    #: responses whose model had no price (their cost is not in ``cost``)
    unpriced: int = 0

    @property
    def tokens(self) -> int:
        """Counted against ``token_limit``: input + output + cache writes (as ``Usage.total``)."""
        return self.input_tokens + self.output_tokens + self.cache_write_tokens


class Meter:
    """Usage per sandbox and task, in the store (so every process sees the same totals)."""

    def __init__(self, store: Store, audit: AuditLog | None = None) -> None:
        """With ``audit``, every recorded response is also an ``llm.usage`` event."""
        self.store = store
        self.audit = audit

    def record(self, sandbox_id: str, usage: Usage | None, *, task_id: str | None = None,
               prices: Mapping[str, Price] | None = None) -> float | None:
        """Store one response's usage; returns its cost when priced. None usage is a no-op."""
        if usage is None:
            return None
        cost = cost_of(usage, prices or {})
        with self.store.session() as s:
            s.add(UsageRow(sandbox_id=sandbox_id, task_id=task_id, provider=usage.provider,
                           model=usage.model, input_tokens=usage.input_tokens,
                           output_tokens=usage.output_tokens,
                           cache_read_tokens=usage.cache_read_tokens,
                           cache_write_tokens=usage.cache_write_tokens, cost=cost))
        if self.audit is not None:
            self.audit.append("llm.usage", sandbox=sandbox_id, task=task_id, actor="proxy",
                              details={"provider": usage.provider, "model": usage.model,
                                       "input_tokens": usage.input_tokens,
                                       "output_tokens": usage.output_tokens,
                                       "cache_read_tokens": usage.cache_read_tokens,
                                       "cache_write_tokens": usage.cache_write_tokens,
                                       "cost": cost})
        return cost

    def totals(self, *, sandbox_id: str | None = None, task_id: str | None = None) -> Totals:
        """Sums over a sandbox, a task, or (with neither) everything."""
        q = select(func.count(UsageRow.id), func.sum(UsageRow.input_tokens),
                   func.sum(UsageRow.output_tokens), func.sum(UsageRow.cache_read_tokens),
                   func.sum(UsageRow.cache_write_tokens), func.sum(UsageRow.cost),
                   func.count(UsageRow.id) - func.count(UsageRow.cost))
        if sandbox_id is not None:
            q = q.where(UsageRow.sandbox_id == sandbox_id)
        if task_id is not None:
            q = q.where(UsageRow.task_id == task_id)
        with self.store.session() as s:
            row = s.execute(q).one()
        n, i, o, cr, cw, cost, unpriced = row
        return Totals(requests=n or 0, input_tokens=i or 0, output_tokens=o or 0,
                      cache_read_tokens=cr or 0, cache_write_tokens=cw or 0,
                      cost=float(cost or 0.0), unpriced=unpriced or 0)

    def check(self, sandbox_id: str, llm: LlmPolicy) -> str | None:
        """A refusal message when the sandbox is at or over a limit, else None."""
        if llm.token_limit is None and llm.cost_limit is None:
            return None
        t = self.totals(sandbox_id=sandbox_id)
        if llm.token_limit is not None and t.tokens >= llm.token_limit:
            return (f"corral: this sandbox has used {t.tokens} model tokens, its limit is "
                    f"{llm.token_limit}; further model calls are refused. Finish with what "
                    "you have, or ask the human to raise llm.token_limit.")
        if llm.cost_limit is not None and t.cost >= llm.cost_limit:
            return (f"corral: this sandbox has spent ${t.cost:.2f} on model calls, its limit "
                    f"is ${llm.cost_limit:.2f}; further model calls are refused. Finish with "
                    "what you have, or ask the human to raise llm.cost_limit.")
        return None


def refusal_response(api: Api | None, message: str
                     ) -> tuple[int, list[tuple[str, str]], bytes]:
    """A 429 in the provider's own error shape, so SDKs show ``message`` and do not retry."""
    if api == "anthropic":
        body: dict[str, Any] = {"type": "error",
                                "error": {"type": "rate_limit_error", "message": message}}
    elif api == "openai":
        body = {"error": {"message": message, "type": "insufficient_quota",
                          "param": None, "code": "corral_limit"}}
    else:
        body = {"error": message}
    data = json.dumps(body).encode()
    return 429, [("content-type", "application/json"), ("content-length", str(len(data))),
                 ("x-should-retry", "false")], data
