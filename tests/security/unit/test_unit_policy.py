"""The policy file: shape, one-line errors with line numbers, corral.yaml defaults."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.security.policy import (
    Policy,
    host_matches,
    load_policy,
    load_repo_policy,
    merge_policies,
)

ISSUE_EXAMPLE = """\
network:
  default: deny                      # deny | ask
  rules:
    - {host: api.github.com, methods: [GET], paths: ["/repos/acme/app/**"], decision: allow}
    - {host: api.github.com, methods: [DELETE], decision: ask, reason: "deleting needs a human"}
    - {host: "*.example.com", decision: deny, reason: "..."}
    - {host: github.com, git: {push: {"refs/heads/main": ask, "refs/heads/*": allow}, delete: deny}}
secrets:
  GITHUB_TOKEN: {source: "env:GITHUB_TOKEN", hosts: [api.github.com, github.com]}
  ANTHROPIC_API_KEY: {source: "file:~/.config/corral/anthropic.key", hosts: [api.anthropic.com]}
filesystem: {deny_read: ["~/.ssh"], allow_write: ["/workspace"]}
approvals: {timeout: 15m}
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_issue_example_loads(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, ISSUE_EXAMPLE))
    assert pol.network.default == "deny"
    assert len(pol.network.rules) == 4
    assert pol.network.rules[2].host == "*.example.com"
    git = pol.network.rules[3].git
    assert git is not None and git.push["refs/heads/main"] == "ask" and git.delete == "deny"
    assert pol.approvals.timeout == 900
    assert pol.secrets["ANTHROPIC_API_KEY"].source == (
        "file:" + str(Path("~/.config/corral/anthropic.key").expanduser()))
    assert pol.source.endswith("policy.yaml")
    assert "4 rules" in pol.summary() and "default deny" in pol.summary()


def test_empty_file_is_the_default_policy(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, ""))
    assert pol.network.default == "deny" and pol.network.rules == []
    assert pol.llm.hosts == {"api.anthropic.com": "anthropic", "api.openai.com": "openai"}


@pytest.mark.parametrize(("text", "line", "key", "msg"), [
    ("network:\n  default: allow\n", 2, "network.default", "'deny' or 'ask'"),
    ("network:\n  rules:\n    - {host: a.test}\n", 3, "network.rules.0", "needs a decision"),
    ("network:\n  rules:\n    - host: a.test\n      decision: allow\n      colour: red\n",
     5, "network.rules.0.colour", "unknown key"),
    ("network:\n  rules:\n    - {host: 'a*.test', decision: allow}\n", 3,
     "network.rules.0.host", "whole first label"),
    ("network:\n  rules:\n    - {host: '127.1', decision: allow}\n", 3,
     "network.rules.0.host", "dotted-quad"),
    ("network:\n  rules:\n    - {host: a.test, paths: [x], decision: allow}\n", 3,
     "network.rules.0.paths", "must start with '/'"),
    ("network:\n  rules:\n    - {host: a.test, methods: ['G T'], decision: allow}\n", 3,
     "network.rules.0.methods", "not an HTTP method"),
    ("network:\n  rules:\n    - {host: a.test, ports: ['90-80'], decision: allow}\n", 3,
     "network.rules.0.ports", "range"),
    ("network:\n  rules:\n    - {host: a.test, port: 1, ports: [2], decision: allow}\n", 3,
     "network.rules.0", "either port or ports"),
    ("network:\n  rules:\n    - {host: a.test, addresses: [10.0.0.0/33], decision: allow}\n",
     3, "network.rules.0.addresses", "CIDR"),
    ("network:\n  rules:\n    - {decision: allow}\n", 3, "network.rules.0", "needs a host"),
    ("network:\n  rules:\n    - {host: a.test, decision: allow, git: {push: {x: allow}}}\n",
     3, "network.rules.0", "decides per ref"),
    ("network:\n  rules:\n    - {host: a.test, git: {}}\n", 3, "network.rules.0",
     "git.push patterns"),
    ("network:\n  rules:\n    - {host: a.test, git: {push: {'refs/heads/*': maybe}}}\n", 3,
     "network.rules.0.git.push.refs/heads/*", "'allow', 'deny' or 'ask'"),
    ("secrets:\n  TOKEN:\n    source: vault:x\n    hosts: [a.test]\n", 3,
     "secrets.TOKEN.source", "env:NAME"),
    ("secrets:\n  TOKEN: {source: 'env:X', hosts: []}\n", 2, "secrets.TOKEN.hosts",
     "at least 1"),
    ("secrets:\n  TOKEN: {source: 'env:X', hosts: ['*']}\n", 2, "secrets.TOKEN.hosts",
     "every host"),
    ("secrets:\n  1BAD: {source: 'env:X', hosts: [a.test]}\n", 2, "secrets.1BAD",
     "variable name"),
    ("approvals: {timeout: soon}\n", 1, "approvals.timeout", "not a duration"),
    ("filesystem: {deny_read: [relative/path]}\n", 1, "filesystem.deny_read", "absolute"),
    ("upstreams:\n  resolve: {api.test: 'not an ip:1'}\n", 2, "upstreams.resolve",
     "IP:PORT"),
    ("upstreams:\n  extra_ca: missing.pem\n", 2, "upstreams.extra_ca", "no such file"),
    ("llm:\n  cost_limit: 5\n", 1, "llm", "needs prices"),
    ("llm:\n  hosts: {api.x.test: google}\n", 2, "llm.hosts.api.x.test", "anthropic"),
    ("version: 2\n", 1, "version", "1"),
    ("- just\n- a list\n", 1, "(top level)", "mapping"),
])
def test_errors_are_one_line_with_file_line_and_key(tmp_path: Path, text: str, line: int,
                                                    key: str, msg: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_policy(p)
    err = str(ei.value)
    assert "\n" not in err
    assert err.startswith(f"{p}:{line}: {key}: "), err
    assert msg in err
    assert ei.value.exit_code == 2


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, "network:\n  rules: [\n")
    with pytest.raises(ConfigError, match=r"policy.yaml:\d+: invalid YAML"):
        load_policy(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_policy(tmp_path / "nope.yaml")


def test_normalization(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, """\
        network:
          rules:
            - {host: API.GitHub.COM., methods: [get, Post], paths: ["/a/./b/../%7ec/**"],
               decision: allow}
            - {host: a.test, methods: ["*"], decision: deny}
        upstreams:
          resolve: {"API.example.test": "127.0.0.1:8443", "b.test:80": "[::1]:8080"}
        """))
    r0, r1 = pol.network.rules
    assert r0.host == "api.github.com" and r0.methods == ["GET", "POST"]
    assert r0.paths == ["/a/~c/**"]
    assert r1.methods is None
    assert pol.upstreams.resolve == {"api.example.test": "127.0.0.1:8443",
                                     "b.test:80": "[::1]:8080"}


def test_relative_paths_are_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ca.pem").write_text("x")
    p = write(tmp_path / "sub", """\
        upstreams: {extra_ca: ca.pem}
        secrets:
          K: {source: "file:key.txt", hosts: [a.test]}
        """)
    pol = load_policy(p)
    assert pol.upstreams.extra_ca == str(tmp_path / "sub" / "ca.pem")
    assert pol.secrets["K"].source == f"file:{tmp_path / 'sub' / 'key.txt'}"


def test_host_matches() -> None:
    assert host_matches("*", "anything.test")
    assert host_matches("*.example.com", "a.example.com")
    assert host_matches("*.example.com", "a.b.example.com")
    assert not host_matches("*.example.com", "example.com")
    assert not host_matches("*.example.com", "badexample.com")
    assert host_matches("example.com", "example.com")
    assert not host_matches("example.com", "a.example.com")


def test_corral_yaml_policy_section_and_merge(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text(textwrap.dedent("""\
        environment:
          setup: [echo hi]
        policy:
          network:
            default: ask
            rules:
              - {host: pypi.org, decision: allow}
          secrets:
            A: {source: "env:A", hosts: [a.test]}
          approvals: {timeout: 5m}
          llm: {token_limit: 1000}
        """))
    base = load_repo_policy(tmp_path)
    assert base is not None and base.network.default == "ask"
    assert base.source.endswith("corral.yaml")
    own = write(tmp_path, """\
        network:
          rules:
            - {host: github.com, decision: allow}
        secrets:
          B: {source: "env:B", hosts: [b.test]}
        llm: {cost_limit: 2, prices: {"m*": {input: 1, output: 2}}}
        """, "task.yaml")
    pol = load_policy(own, defaults=base)
    assert [r.host for r in pol.network.rules] == ["pypi.org", "github.com"]
    assert pol.network.default == "ask"  # not set by the task's file: the default stays
    assert set(pol.secrets) == {"A", "B"}
    assert pol.approvals.timeout == 300
    assert pol.llm.token_limit == 1000 and pol.llm.cost_limit == 2
    assert "task.yaml" in pol.source and "corral.yaml" in pol.source
    # an explicit setting in the task's file wins
    own.write_text("network: {default: deny}\n")
    assert load_policy(own, defaults=base).network.default == "deny"
    assert merge_policies(None, base) is base


def test_corral_yaml_policy_errors_name_the_policy_key(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text("ci: {command: make}\npolicy:\n  network:\n"
                                          "    default: maybe\n")
    with pytest.raises(ConfigError) as ei:
        load_repo_policy(tmp_path)
    assert str(ei.value).startswith(f"{tmp_path / 'corral.yaml'}:4: policy.network.default:")
    (tmp_path / "corral.yaml").write_text("ci: {command: make}\n")
    assert load_repo_policy(tmp_path) is None
    assert load_repo_policy(tmp_path / "nowhere") is None


def test_corral_yaml_with_policy_still_loads_as_repo_config(tmp_path: Path) -> None:
    from corral.config import load_repo_config

    (tmp_path / "corral.yaml").write_text("policy:\n  network: {default: ask}\n")
    assert load_repo_config(tmp_path).source.endswith("corral.yaml")


def test_policy_is_immutable() -> None:
    pol = Policy()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        pol.network.default = "ask"  # type: ignore[misc]
