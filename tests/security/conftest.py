"""Fixtures of the fence tests: real TLS upstreams on loopback, policies pointing
test names at them, and fenced sandboxes that are destroyed after each use.

The upstreams answer for ``*.example.test`` names through the policy's
``upstreams.resolve`` (HTTPS on one port for :443, plain HTTP on another for :80)
and present certificates from a throwaway CA that the policy's
``upstreams.extra_ca`` trusts.
"""

from __future__ import annotations

import ssl
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fence_servers import Upstream

NAMES = ["api.example.test", "other.example.test", "files.example.test", "git.example.test",
         "pypi.example.test", "llm.example.test", "ws.example.test"]


@pytest.fixture(scope="session", autouse=True)
def _stop_proxy_daemon(corral_home: Path) -> Iterator[None]:
    """The daemon is started on demand by fenced sandboxes; stop it at the end."""
    yield
    from corral.security.daemon import DaemonClient

    DaemonClient(corral_home).stop()


@pytest.fixture(scope="session")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def upstream_ca_file(upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    path = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    upstream_ca.cert_pem.write_to_path(str(path))
    return path


def _server_context(ca: trustme.CA, names: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def tls_upstream(upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Upstream]:
    git_root = tmp_path_factory.mktemp("git-root")
    index_root = tmp_path_factory.mktemp("index-root")
    from fence_servers import make_index

    make_index(index_root)
    up = Upstream(_server_context(upstream_ca, [*NAMES, "localhost", "127.0.0.1"]),
                  git_root=git_root, index_root=index_root)
    yield up
    up.close()


@pytest.fixture(scope="session")
def plain_upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


class PolicyWriter:
    """Writes policy files whose test names resolve to the loopback upstreams."""

    def __init__(self, directory: Path, tls: Upstream, plain: Upstream, ca_file: Path) -> None:
        self.directory = directory
        self.tls, self.plain, self.ca_file = tls, plain, ca_file
        self.count = 0

    def resolve_block(self, extra: dict[str, str] | None = None) -> str:
        lines = [f'    "{k}": "{v}"' for k, v in (extra or {}).items()]
        for n in NAMES:
            for port, up in ((443, self.tls), (80, self.plain)):
                if f"{n}:{port}" not in (extra or {}):
                    lines.append(f'    "{n}:{port}": "127.0.0.1:{up.port}"')
        return "\n".join(lines)

    def text(self, rules: str, extra: str = "", default: str = "deny",
             resolve: dict[str, str] | None = None) -> str:
        body = textwrap.dedent(rules).strip("\n")
        rules_block = textwrap.indent(body, "    ") if body else "    []"
        return (f"network:\n  default: {default}\n  rules:\n{rules_block}\n"
                f"upstreams:\n  extra_ca: {self.ca_file}\n  resolve:\n"
                f"{self.resolve_block(resolve)}\n{textwrap.dedent(extra)}")

    def __call__(self, rules: str, extra: str = "", default: str = "deny",
                 path: Path | None = None, resolve: dict[str, str] | None = None) -> Path:
        self.count += 1
        p = path or self.directory / f"policy-{self.count}.yaml"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(self.text(rules, extra, default, resolve))
        tmp.replace(p)
        return p


@pytest.fixture
def write_policy(tmp_path: Path, tls_upstream: Upstream, plain_upstream: Upstream,
                 upstream_ca_file: Path) -> PolicyWriter:
    return PolicyWriter(tmp_path, tls_upstream, plain_upstream, upstream_ca_file)


@pytest.fixture
def fenced() -> Iterator[Callable[..., Any]]:
    """``fenced(policy_path, **create_kwargs)`` -> a fenced sandbox, destroyed after the test."""
    from corral.security.fence import Fence

    made: list[Any] = []

    def make(policy: Path, *, transparent: bool = True, **kw: Any) -> Any:
        sbx = Fence.from_file(policy, transparent=transparent).create_sandbox(**kw)
        made.append(sbx)
        return sbx

    yield make
    for sbx in made:
        try:
            sbx.destroy()
        except Exception:  # destroyed by the test itself
            pass

