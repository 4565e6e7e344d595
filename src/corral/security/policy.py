"""The security policy: a YAML file per sandbox or task, defaults in ``corral.yaml``.

    network:
      default: deny
      rules:
        - {host: api.github.com, methods: [GET], paths: ["/repos/acme/app/**"], decision: allow}
        - {host: github.com, git: {push: {"refs/heads/main": ask, "refs/heads/*": allow}}}
    secrets:
      GITHUB_TOKEN: {source: "env:GITHUB_TOKEN", hosts: [api.github.com, github.com]}
    approvals: {timeout: 15m}

``load_policy(path)`` validates a file and raises ``ConfigError`` with one line
``file:line: dotted.key: message``. The ``policy:`` section of ``corral.yaml``
has the same shape and is the default a sandbox's own policy file is layered on
(``merge_policies``). The full reference is ``docs/policy.md``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from corral.config import Duration, format_validation_error, load_yaml
from corral.errors import ConfigError
from corral.security.canon import (
    InvalidHost,
    InvalidPath,
    canonical_host,
    canonical_path,
    split_authority,
)

__all__ = [
    "ApprovalsPolicy",
    "FilesystemPolicy",
    "GitPolicy",
    "LlmPolicy",
    "NetworkPolicy",
    "Policy",
    "Price",
    "Rule",
    "SecretSpec",
    "UpstreamsPolicy",
    "host_matches",
    "load_policy",
    "load_repo_policy",
    "merge_policies",
    "parse_policy",
]

Action = Literal["allow", "deny", "ask"]
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REF = re.compile(r"^[\x21-\x7e]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- validators shared by several keys ------------------------------------------


def check_host_pattern(value: str) -> str:
    """``example.com``, ``*.example.com`` or ``*``, in canonical form. Raises ValueError."""
    if value == "*":
        return value
    if value.startswith("*."):
        return "*." + _canon_host(value[2:])
    if "*" in value:
        raise ValueError(f"{value!r}: '*' is only allowed as the whole first label (*.example.com)")
    return _canon_host(value)


def _canon_host(value: str) -> str:
    try:
        return canonical_host(value)
    except InvalidHost as exc:
        raise ValueError(str(exc)) from None


def host_matches(pattern: str, host: str) -> bool:
    """Whether canonical ``host`` matches a canonical host pattern.

    ``*`` matches every host; ``*.example.com`` matches any name below
    example.com (at any depth) but not example.com itself."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _expand(path: str, info: ValidationInfo) -> str:
    """``~`` expanded; a relative path is taken relative to the policy file."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        base = (info.context or {}).get("base_dir")
        if base is not None:
            p = Path(base) / p
    return str(p)


HostPattern = Annotated[str, Field(min_length=1, max_length=260)]


def _secret_name(name: str) -> str:
    if not _SECRET_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid environment variable name")
    return name


SecretName = Annotated[str, AfterValidator(_secret_name)]


# -- network --------------------------------------------------------------------


class GitPolicy(_Model):
    """Decisions per ref for ``git push`` over smart HTTP (git-receive-pack)."""

    #: ref pattern -> decision; ``*`` matches any characters, '/' included (git refspecs)
    push: dict[str, Action] = Field(default_factory=dict)
    #: the decision for deleting a ref (else deletions go through ``push`` patterns)
    delete: Action | None = None

    @field_validator("push")
    @classmethod
    def _refs(cls, v: dict[str, Action]) -> dict[str, Action]:
        for ref in v:
            if not _REF.match(ref):
                raise ValueError(f"{ref!r} is not a ref pattern (e.g. refs/heads/*)")
        return v


class Rule(_Model):
    """One network rule. Every key given must match; an absent key matches anything."""

    host: HostPattern | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    ports: list[int | str] | None = None
    methods: list[str] | None = None
    paths: list[str] | None = None
    #: IP addresses / CIDRs this rule names: lets a host reach them even when they are
    #: private, loopback or link-local, and matches requests to such IP literals
    addresses: list[str] | None = None
    decision: Action | None = None
    #: written for the agent: the body of the 403, or the prompt of an approval
    reason: str | None = Field(default=None, max_length=2000)
    git: GitPolicy | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return None if v is None else check_host_pattern(v)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int | str] | None) -> list[int | str] | None:
        for p in v or []:
            lo, hi = _port_range(p)
            if not (1 <= lo <= hi <= 65535):
                raise ValueError(f"{p!r} is not a port or a range like 8000-8100")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [m.upper() for m in v]
        for m in out:
            if m != "*" and not _METHOD.match(m):
                raise ValueError(f"{m!r} is not an HTTP method")
        return None if "*" in out else out

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = []
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"path pattern {p!r} must start with '/'")
            try:
                out.append(canonical_path(p, ("encoded_slash", "semicolon")))
            except InvalidPath as exc:
                raise ValueError(f"path pattern {p!r}: {exc}") from None
        return out

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        for a in v or []:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ValueError(f"{a!r} is not an IP address or CIDR") from None
        return v

    @model_validator(mode="after")
    def _shape(self) -> Rule:
        if self.host is None and not self.addresses:
            raise ValueError("a rule needs a host (or addresses)")
        if self.port is not None and self.ports is not None:
            raise ValueError("give either port or ports, not both")
        if self.git is not None:
            if self.decision is not None:
                raise ValueError("a git rule decides per ref: put decisions under git.push "
                                 "and git.delete, not in decision")
            if self.methods is not None:
                raise ValueError("a git rule matches pushes only; methods do not apply")
            if not self.git.push and self.git.delete is None:
                raise ValueError("a git rule needs git.push patterns or git.delete")
        elif self.decision is None:
            raise ValueError("a rule needs a decision: allow, deny or ask")
        return self

    def port_ranges(self) -> list[tuple[int, int]] | None:
        if self.port is not None:
            return [(self.port, self.port)]
        if self.ports is not None:
            return [_port_range(p) for p in self.ports]
        return None


def _port_range(p: int | str) -> tuple[int, int]:
    if isinstance(p, int):
        return p, p
    lo, sep, hi = p.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        return 0, 0


class NetworkPolicy(_Model):
    default: Literal["deny", "ask"] = "deny"
    #: the reason given when no rule matches (written for the agent)
    default_reason: str | None = Field(default=None, max_length=2000)
    rules: list[Rule] = Field(default_factory=list)
    #: hosts whose paths may carry an encoded '/' (%2F), e.g. npm scoped packages
    allow_encoded_slash: list[HostPattern] = Field(default_factory=list)
    #: hosts whose paths may carry ';' (matrix parameters)
    allow_semicolon: list[HostPattern] = Field(default_factory=list)

    @field_validator("allow_encoded_slash", "allow_semicolon")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [check_host_pattern(h) for h in v]


# -- secrets, filesystem, approvals, upstreams, llm -------------------------------


class SecretSpec(_Model):
    """Where a secret's real value comes from and the hosts it may be sent to."""

    #: ``env:NAME``, ``file:PATH`` (``~`` expanded) or ``command:CMD`` (run once on the host)
    source: str
    hosts: list[HostPattern] = Field(min_length=1)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str, info: ValidationInfo) -> str:
        kind, sep, arg = v.partition(":")
        if not sep or kind not in ("env", "file", "command") or not arg.strip():
            raise ValueError(f"{v!r}: source must be env:NAME, file:PATH or command:CMD")
        if kind == "file":
            return "file:" + _expand(arg, info)
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        out = [check_host_pattern(h) for h in v]
        if "*" in out:
            raise ValueError("a secret cannot be bound to every host ('*')")
        return out


class FilesystemPolicy(_Model):
    """Extra filesystem boundaries on top of the sandbox defaults (read by the Fence)."""

    deny_read: list[str] = Field(default_factory=list)
    allow_write: list[str] = Field(default_factory=list)

    @field_validator("deny_read", "allow_write")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not (p.startswith("/") or p.startswith("~")):
                raise ValueError(f"{p!r} must be an absolute path or start with ~")
        return v


class ApprovalsPolicy(_Model):
    #: how long an ``ask`` holds the request before it is denied
    timeout: Duration = 900.0


class UpstreamsPolicy(_Model):
    """Where requests really go: tests and mirrors point names at loopback."""

    #: ``name`` or ``name:port`` -> ``address:port`` (or ``address`` for the same port)
    resolve: dict[str, str] = Field(default_factory=dict)
    #: a PEM bundle of extra CAs trusted for upstream TLS (relative to the policy file)
    extra_ca: str | None = None

    @field_validator("resolve")
    @classmethod
    def _resolve(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, target in v.items():
            try:
                h, p = split_authority(name)
                key = canonical_host(h) + (f":{p}" if p is not None else "")
                th, _tp = split_authority(target)
                ipaddress.ip_address(th.strip("[]"))
            except (InvalidHost, ValueError):
                raise ValueError(f"{name}: {target!r} must be IP:PORT (e.g. 127.0.0.1:8443)"
                                 ) from None
            out[key] = target
        return out

    @field_validator("extra_ca")
    @classmethod
    def _ca(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        path = _expand(v, info)
        if not Path(path).is_file():
            raise ValueError(f"{v}: no such file")
        return path


class Price(_Model):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)


def _default_llm_hosts() -> dict[str, Literal["anthropic", "openai"]]:
    return {"api.anthropic.com": "anthropic", "api.openai.com": "openai"}


class LlmPolicy(_Model):
    """Model API metering and limits (per sandbox)."""

    #: host pattern -> the API it speaks; responses from these hosts are metered
    hosts: dict[str, Literal["anthropic", "openai"]] = Field(
        default_factory=_default_llm_hosts)
    #: total tokens (input + output + cache writes) a sandbox may use
    token_limit: int | None = Field(default=None, ge=0)
    #: USD a sandbox may spend; needs ``prices`` for the models it uses
    cost_limit: float | None = Field(default=None, ge=0)
    #: model name pattern (``*`` wildcard) -> price
    prices: dict[str, Price] = Field(default_factory=dict)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {check_host_pattern(h): api for h, api in v.items()}

    @model_validator(mode="after")
    def _cost(self) -> LlmPolicy:
        if self.cost_limit is not None and not self.prices:
            raise ValueError("cost_limit needs prices for the models in use")
        return self


class Policy(_Model):
    """A whole policy document."""

    version: Literal[1] = 1
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    secrets: dict[SecretName, SecretSpec] = Field(default_factory=dict)
    filesystem: FilesystemPolicy = Field(default_factory=FilesystemPolicy)
    approvals: ApprovalsPolicy = Field(default_factory=ApprovalsPolicy)
    upstreams: UpstreamsPolicy = Field(default_factory=UpstreamsPolicy)
    llm: LlmPolicy = Field(default_factory=LlmPolicy)

    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """Where the policy came from (a path, ``corral.yaml``, or ``defaults``)."""
        return self._source or "defaults"

    def summary(self) -> str:
        """One line for ``corral policy check``."""
        counts = dict.fromkeys(("allow", "ask", "deny"), 0)
        git = 0
        for r in self.network.rules:
            if r.git is not None:
                git += 1
            else:
                counts[r.decision or "allow"] += 1
        parts = [f"{len(self.network.rules)} rules ({counts['allow']} allow, "
                 f"{counts['ask']} ask, {counts['deny']} deny, {git} git)",
                 f"default {self.network.default}",
                 f"{len(self.secrets)} secrets",
                 f"approval timeout {self.approvals.timeout:g}s"]
        if self.llm.token_limit is not None:
            parts.append(f"token limit {self.llm.token_limit}")
        if self.llm.cost_limit is not None:
            parts.append(f"cost limit ${self.llm.cost_limit:g}")
        return ", ".join(parts)


# -- loading --------------------------------------------------------------------


_format = format_validation_error  # one error format for every corral file


def parse_policy(data: Any, *, where: str = "policy", lines: dict[Any, int] | None = None,
                 base_dir: Path | None = None, prefix: tuple[str, ...] = ()) -> Policy:
    """Validate an already-parsed policy document. Raises ``ConfigError``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:{(lines or {}).get(prefix, 1)}: "
                          f"{'.'.join(prefix) or '(top level)'}: a policy must be a mapping")
    try:
        policy = Policy.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format(exc, where, lines or {}, prefix)) from None
    policy._source = where
    return policy


def load_policy(path: str | Path, *, defaults: Policy | None = None) -> Policy:
    """Read and validate a policy file; layered on ``defaults`` when given.

    Raises ``ConfigError`` with one line ``file:line: dotted.key: message``."""
    p = Path(path)
    data, lines = load_yaml(p)
    policy = parse_policy(data, where=str(p), lines=lines, base_dir=p.absolute().parent)
    return merge_policies(defaults, policy) if defaults is not None else policy


def load_repo_policy(repo: str | Path) -> Policy | None:
    """The ``policy:`` section of the repository's ``corral.yaml``, if it has one."""
    path = Path(repo) / "corral.yaml"
    if not path.exists():
        return None
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or data.get("policy") is None:
        return None
    return parse_policy(data["policy"], where=str(path), lines=lines,
                        base_dir=path.absolute().parent, prefix=("policy",))


def merge_policies(base: Policy | None, override: Policy) -> Policy:
    """``override`` layered on ``base``: rules of both apply (base first), secrets,
    prices and upstreams merge by name (override wins), filesystem lists are joined,
    and every other key the override sets explicitly replaces the base's."""
    if base is None:
        return override

    def pick(section: str) -> Any:
        b, o = getattr(base, section), getattr(override, section)
        fields = {k: getattr(b, k) for k in type(b).model_fields}
        fields.update({k: getattr(o, k) for k in o.model_fields_set})
        return fields

    net = pick("network")
    net["rules"] = [*base.network.rules, *override.network.rules]
    for k in ("allow_encoded_slash", "allow_semicolon"):
        net[k] = [*getattr(base.network, k), *getattr(override.network, k)]
    up = pick("upstreams")
    up["resolve"] = {**base.upstreams.resolve, **override.upstreams.resolve}
    llm = pick("llm")
    llm["prices"] = {**base.llm.prices, **override.llm.prices}
    if "hosts" in override.llm.model_fields_set:
        llm["hosts"] = {**base.llm.hosts, **override.llm.hosts}
    merged = Policy.model_construct(
        version=1,
        network=NetworkPolicy.model_construct(**net),
        secrets={**base.secrets, **override.secrets},
        filesystem=FilesystemPolicy.model_construct(
            deny_read=[*base.filesystem.deny_read, *override.filesystem.deny_read],
            allow_write=[*base.filesystem.allow_write, *override.filesystem.allow_write]),
        approvals=ApprovalsPolicy.model_construct(**pick("approvals")),
        upstreams=UpstreamsPolicy.model_construct(**up),
        llm=LlmPolicy.model_construct(**llm),
    )
    merged._source = f"{override.source} (on {base.source})"
    return merged
