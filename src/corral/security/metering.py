"""LLM metering: read token usage out of model API responses the proxy forwards.

    parser = parser_for(engine.policy.llm, host, method, path, content_type, encoding)
    for chunk in response_body: parser.feed(chunk)        # as it streams to the client
    meter.record(sandbox_id, parser.usage(), task_id=..., prices=policy.llm.prices)
    refusal = meter.check(sandbox_id, policy.llm)        # before forwarding a model call
    if refusal: status, headers, body = refusal_response(api, refusal)   # a 429

    meter.set_limit(sandbox_id, tokens=1200, token_label="the task's token budget")
    meter.take(sandbox_id)                                # usage since the last take

A sandbox is refused at the lower of the policy's ``llm`` limits and its own
(``set_limit``: the orchestrator keeps it at what is left of the task's
budgets). ``take`` hands the usage out piece by piece, with its place kept in
the store, so the orchestrator can charge budgets from the wire for a harness
that reports no usage of its own (``orchestrator_meter``).

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

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from corral.security.audit import AuditLog
from corral.security.policy import LlmPolicy, Price, host_matches
from corral.security.types import Usage
from corral.store import Store
from corral.store.security_models import SandboxLimitRow, UsageRow

__all__ = [
    "AnthropicParser",
    "Meter",
    "OpenAIChatParser",
    "OpenAIResponsesParser",
    "SSEDecoder",
    "SandboxLimit",
    "Totals",
    "api_for_host",
    "cost_of",
    "orchestrator_meter",
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
        return self._sums(sandbox_id=sandbox_id, task_id=task_id)[0]

    def _sums(self, *, sandbox_id: str | None = None, task_id: str | None = None,
              after_id: int = 0) -> tuple[Totals, int]:
        """The sums over the rows past ``after_id``, and the last row's id (0: none)."""
        q = select(func.count(UsageRow.id), func.sum(UsageRow.input_tokens),
                   func.sum(UsageRow.output_tokens), func.sum(UsageRow.cache_read_tokens),
                   func.sum(UsageRow.cache_write_tokens), func.sum(UsageRow.cost),
                   func.count(UsageRow.id) - func.count(UsageRow.cost), func.max(UsageRow.id))
        if sandbox_id is not None:
            q = q.where(UsageRow.sandbox_id == sandbox_id)
        if task_id is not None:
            q = q.where(UsageRow.task_id == task_id)
        if after_id:
            q = q.where(UsageRow.id > after_id)
        with self.store.session() as s:
            row = s.execute(q).one()
        n, i, o, cr, cw, cost, unpriced, last = row
        return (Totals(requests=n or 0, input_tokens=i or 0, output_tokens=o or 0,
                       cache_read_tokens=cr or 0, cache_write_tokens=cw or 0,
                       cost=float(cost or 0.0), unpriced=unpriced or 0), int(last or 0))

    # -- per-sandbox limits ----------------------------------------------------------
    def set_limit(self, sandbox_id: str, tokens: int | None = None, usd: float | None = None,
                  *, task_id: str | None = None, token_label: str | None = None,
                  usd_label: str | None = None) -> None:
        """Refuse ``sandbox_id``'s model calls once its metered totals reach ``tokens``
        (as ``Totals.tokens``) or ``usd``, besides the policy's limits; None lifts
        that limit. The labels name what a limit stands for in the refusal the agent
        reads ("the task's token budget (budgets.task_tokens: 500)")."""
        values = {"token_limit": tokens, "cost_limit": usd, "token_label": token_label,
                  "cost_label": usd_label}
        if task_id is not None:
            values["task_id"] = task_id
        self._upsert(sandbox_id, values, {})

    def limit(self, sandbox_id: str) -> SandboxLimit | None:
        """The sandbox's own limits and refusals, or None when it never had any."""
        with self.store.session() as s:
            row = s.get(SandboxLimitRow, sandbox_id)
            if row is None:
                return None
            return SandboxLimit(tokens=row.token_limit, usd=row.cost_limit,
                                token_label=row.token_label, usd_label=row.cost_label,
                                refusals=row.refusals, last_refusal=row.last_refusal)

    def check(self, sandbox_id: str, llm: LlmPolicy) -> str | None:
        """A refusal message when the sandbox is at or over a limit, else None.

        The limit is the lower of the policy's (``llm.token_limit``, ``cost_limit``)
        and the sandbox's own (``set_limit``); a refusal is counted and kept with
        the sandbox's limits (``limit(...).refusals``), so whoever runs the agent
        learns of it even when the agent keeps quiet about it."""
        own = self.limit(sandbox_id)
        own_tokens = own.tokens if own else None
        own_usd = own.usd if own else None
        if (llm.token_limit is None and llm.cost_limit is None and own_tokens is None
                and own_usd is None):
            return None
        t = self.totals(sandbox_id=sandbox_id)
        message = None
        tok = _lower(llm.token_limit, own_tokens)
        usd = _lower(llm.cost_limit, own_usd)
        if tok is not None and t.tokens >= tok[0]:
            label = ((own and own.token_label) or "its token limit") if tok[1] else None
            message = _refusal(f"used {t.tokens} model tokens", str(int(tok[0])), label,
                               "llm.token_limit")
        elif usd is not None and t.cost >= usd[0]:
            label = ((own and own.usd_label) or "its spending limit") if usd[1] else None
            message = _refusal(f"spent ${t.cost:.2f} on model calls", f"${usd[0]:.2f}", label,
                               "llm.cost_limit")
        if message is not None:
            self._upsert(sandbox_id, {"last_refusal": message},
                         {"refusals": SandboxLimitRow.refusals + 1}, new={"refusals": 1})
        return message

    def take(self, sandbox_id: str) -> Totals:
        """The sandbox's usage recorded since the last ``take`` (from its first record
        on the first call). The place is kept in the store: another process, or the
        same one after a restart, carries on from it and never gets a record twice."""
        for _ in range(20):
            with self.store.session() as s:
                row = s.get(SandboxLimitRow, sandbox_id)
                after = row.taken_id if row is not None else 0
            got, last = self._sums(sandbox_id=sandbox_id, after_id=after)
            if not last:
                return Totals()
            # compare and set: a concurrent taker makes this one read again
            with self.store.session() as s:
                if row is not None:
                    res = s.execute(update(SandboxLimitRow).where(
                        SandboxLimitRow.sandbox_id == sandbox_id,
                        SandboxLimitRow.taken_id == after).values(taken_id=last))
                    if getattr(res, "rowcount", 0) == 1:
                        return got
                    continue
            try:
                with self.store.session() as s:
                    s.add(SandboxLimitRow(sandbox_id=sandbox_id, taken_id=last,
                                          refusals=0))
                return got
            except IntegrityError:
                continue
        raise RuntimeError(f"metering: could not take the usage of {sandbox_id}")

    def _upsert(self, sandbox_id: str, values: dict[str, Any], exprs: dict[str, Any],
                new: dict[str, Any] | None = None) -> None:
        """Update the sandbox's limits row with ``values`` and ``exprs`` (SQL
        expressions), or insert it with ``values`` and ``new``."""
        for _ in range(3):
            with self.store.session() as s:
                res = s.execute(update(SandboxLimitRow)
                                .where(SandboxLimitRow.sandbox_id == sandbox_id)
                                .values(**values, **exprs))
                if getattr(res, "rowcount", 0):
                    return
            try:
                with self.store.session() as s:
                    s.add(SandboxLimitRow(sandbox_id=sandbox_id,
                                          **{"refusals": 0, **values, **(new or {})}))
                return
            except IntegrityError:
                continue  # made meanwhile by someone else: update it


@dataclass(frozen=True)
class SandboxLimit:
    """A sandbox's own limits (``Meter.set_limit``) and the calls refused it."""

    tokens: int | None = None
    usd: float | None = None
    token_label: str | None = None
    usd_label: str | None = None
    #: model calls refused to the sandbox, under any limit
    refusals: int = 0
    last_refusal: str | None = None


def _refusal(spent: str, limit: str, label: str | None, policy_key: str) -> str:
    """What a refused model call reads: under the sandbox's own limit (``label`` names
    the budget it stands for), or under the policy's ``policy_key``."""
    if label is not None:
        return (f"corral: {label} is spent: this sandbox has {spent}, its limit is {limit}; "
                "further model calls are refused. Stop here and finish with what you have; "
                "a human can raise the budget in corral.yaml.")
    return (f"corral: this sandbox has {spent}, its limit is {limit}; further model calls "
            f"are refused. Finish with what you have, or ask the human to raise {policy_key}.")


def _lower(policy: float | None, own: float | None) -> tuple[float, bool] | None:
    """The lower of two limits, and whether it is the sandbox's own (on a tie too)."""
    if own is not None and (policy is None or own <= policy):
        return float(own), True
    if policy is not None:
        return float(policy), False
    return None


def orchestrator_meter(store: Store) -> Meter:
    """The meter as the orchestrator uses it (``corral.orchestrator.budgets.proxy_meter``):
    ``take`` for usage since the last call, ``totals``, ``set_limit``, ``limit``."""
    return Meter(store)


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
