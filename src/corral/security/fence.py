"""``Fence``: sandboxes whose only way out is corral's proxy, under a policy.

    sbx = Fence.from_file("policy.yaml").create_sandbox(workspace="~/src/app")
    sbx.commands.run("curl -sS https://api.github.com/zen")   # through the proxy

Creating a fenced sandbox: the policy is validated, its secrets are read on
this host (the sandbox gets sentinels in their place), a CA is made for the
sandbox, and the sandbox is created with hook files (its system CA bundle with
that CA added, a resolv.conf naming the DNS stub) and hook environment (proxy
and CA variables, the sentinels). Then the proxy daemon is started if needed
and attaches to the sandbox's network namespace. Destroying the sandbox, from
any process, detaches it and removes its fence state.

Many sandboxes may be created at once, from threads and processes: the fence
state of each is written whole before the daemon may read it, the ``Fence``
holds the sandbox's attach lock until the daemon serves it (a daemon starting
meanwhile leaves it to this ``Fence``), attaching is idempotent, and the
answer is checked: the daemon's listeners must be in *this* sandbox's network
namespace. A sandbox that cannot be fenced is destroyed (stopped, if even that
fails) and the caller gets the error: it never runs without its proxy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.compute import events
from corral.compute.context import get_context, new_id
from corral.compute.sandbox import Sandbox
from corral.compute.types import Hooks, Limits
from corral.errors import CorralError, SandboxError
from corral.security.ca import CertificateAuthority
from corral.security.daemon import (
    DaemonClient,
    ProxyUnavailable,
    attach_lock,
    fence_dir,
    fence_root,
)
from corral.security.netns import PROXY_PORT, netns_id
from corral.security.policy import Policy, load_policy
from corral.security.proxy.attachment import FenceRecord
from corral.security.secrets import Broker, resolve_source, sentinel_key

__all__ = ["BUNDLE", "CA_FILE", "Fence", "fence_env"]

log = logging.getLogger("corral.security.fence")

#: the sandbox's system CA bundle (host bundle + its corral CA)
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: the corral CA alone (for NODE_EXTRA_CA_CERTS and update-ca-certificates)
CA_FILE = "/usr/local/share/ca-certificates/corral-sandbox-ca.crt"
RESOLV_CONF = b"# corral: the fence's DNS stub; queries never leave the host\n" \
              b"nameserver 127.0.0.1\noptions edns0 trust-ad\n"
NO_PROXY = "localhost,127.0.0.1,::1"


def fence_env(sentinels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every command in a fenced sandbox (without host values)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    env = {
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY, "NODE_USE_ENV_PROXY": "1",
        "SSL_CERT_FILE": BUNDLE, "REQUESTS_CA_BUNDLE": BUNDLE, "CURL_CA_BUNDLE": BUNDLE,
        "GIT_SSL_CAINFO": BUNDLE, "PIP_CERT": BUNDLE, "NODE_EXTRA_CA_CERTS": CA_FILE,
    }
    env.update(sentinels or {})
    return env


class Fence:
    """A policy to create sandboxes in. ``policy`` is a file (followed: edits apply to
    running sandboxes within a second) or a ``Policy`` (kept as created)."""

    def __init__(self, policy: Policy | str | Path, *, home: str | Path | None = None,
                 transparent: bool = True) -> None:
        self.home = home
        self.transparent = transparent
        if isinstance(policy, Policy):
            self.policy_path: Path | None = None
            self.policy = policy
        else:
            self.policy_path = Path(policy).expanduser().absolute()
            # validate now: a broken file is a usage error before anything is made
            self.policy = load_policy(self.policy_path)

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> Fence:
        """A fence following the policy file at ``path``. Raises ``ConfigError``."""
        return cls(path, **kw)

    def create_sandbox(
        self,
        env: str = "default",
        workspace: str | Path | None = None,
        limits: Limits | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        user: str = "agent",
        env_vars: Mapping[str, str] | None = None,
        expose: Sequence[str] = (),
        base: str = "host",
        provider: str = "local",
        task_id: str | None = None,
    ) -> Sandbox:
        """Create and start a sandbox inside this fence (same arguments as
        ``Sandbox.create``). Returns once the proxy serves it, with its listeners
        checked to be in the sandbox's network namespace. Safe to call from many
        threads and processes at once.

        Raises ``ConfigError`` for a broken policy or an unreadable secret,
        ``ProxyUnavailable`` when the daemon cannot start or does not answer in time,
        ``SandboxError`` when attaching fails. The sandbox is then destroyed and
        nothing is left behind (if even destroying fails, it is stopped and the error
        says so): a sandbox never runs without its proxy."""
        def make(hooks: Hooks, home: Path, meta: dict[str, str]) -> Sandbox:
            return Sandbox.create(env=env, workspace=workspace, limits=limits, metadata=meta,
                                  user=user, env_vars=env_vars, expose=expose, hooks=hooks,
                                  base=base, provider=provider, home=home)

        return self._fenced(make, metadata, task_id)

    def fork_sandbox(
        self,
        snapshot: str,
        metadata: Mapping[str, str] | None = None,
        *,
        limits: Limits | None = None,
        task_id: str | None = None,
    ) -> Sandbox:
        """A new sandbox from ``snapshot`` (``Sandbox.fork``), inside this fence.

        The snapshot's own CA bundle, resolv.conf and sentinels (of the fence it was
        taken in) are replaced by this fence's; same guarantees as ``create_sandbox``.
        """

        def make(hooks: Hooks, home: Path, meta: dict[str, str]) -> Sandbox:
            return Sandbox.fork(snapshot, 1, metadata=meta, limits=limits, hooks=hooks,
                                home=home)[0]

        return self._fenced(make, metadata, task_id)

    def _fenced(self, make: Callable[[Hooks, Path, dict[str, str]], Sandbox],
                metadata: Mapping[str, str] | None, task_id: str | None) -> Sandbox:
        ctx = get_context(self.home)
        home = ctx.home
        meta = dict(metadata or {})
        task = task_id or meta.get("corral.task") or meta.get("task")
        token = new_id("fx", 16)
        values = {name: (resolve_source(name, spec.source), list(spec.hosts))
                  for name, spec in self.policy.secrets.items()}
        sentinels = Broker(token, values, key=sentinel_key(home)).sentinels() if values else {}
        staging = fence_root(home) / f".staging-{token}"
        fence_root(home).mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = CertificateAuthority.create(staging)
        hooks = Hooks(
            env=fence_env(sentinels),
            files={BUNDLE: ca.trust_bundle(), CA_FILE: ca.cert_pem,
                   "/etc/resolv.conf": RESOLV_CONF},
            labels={"corral.fence": token,
                    "corral.policy": str(self.policy_path or "(inline)")},
        )
        try:
            sbx = make(hooks, home, meta)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _homes[sbx.id] = home
        d = fence_dir(home, sbx.id)
        abandoned = False
        try:
            # until the daemon serves it, the sandbox is this Fence's to attach or
            # destroy (the lock file moves with the directory)
            with attach_lock(staging):
                try:
                    os.replace(staging, d)
                    self._attach(sbx, home, d, token, task, values)
                except BaseException as exc:
                    abandoned = True
                    _abandon(sbx, d, exc)
                    raise
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if not abandoned:
                _abandon(sbx, d, exc)
            raise
        return sbx

    def _attach(self, sbx: Sandbox, home: Path, d: Path, token: str,
                task: str | None, values: dict[str, tuple[str, list[str]]]) -> None:
        if self.policy_path is not None:
            policy_file = self.policy_path
        else:
            policy_file = d / "policy.json"
            tmp = d / ".policy.json.tmp"
            tmp.write_text(json.dumps(_policy_document(self.policy), indent=2))
            os.replace(tmp, policy_file)
        netns = sbx.netns_path
        if netns is None:
            raise SandboxError("this sandbox provider has no network namespace to fence",
                               sandbox_id=sbx.id)
        expected = str(netns_id(netns))
        FenceRecord(sandbox_id=sbx.id, policy=str(policy_file), netns=str(netns), token=token,
                    task_id=task, transparent=self.transparent).save(d)
        client = DaemonClient(home)
        client.ensure_running()
        try:
            answer = client.attach(sbx.id, secrets=values)
        except ProxyUnavailable as exc:
            if exc.timed_out:
                raise
            # the daemon went away without answering (exiting for idleness, killed):
            # attaching is idempotent, so ask the next one
            client.ensure_running()
            answer = client.attach(sbx.id, secrets=values)
        wrong = {role: ns for role, ns in (answer.get("listeners") or {}).items()
                 if ns != expected}
        if answer.get("netns") != expected or wrong or not answer.get("listeners"):
            raise SandboxError(f"the proxy's listeners are not in the sandbox's network "
                               f"namespace {expected}: {answer.get('listeners')}",
                               sandbox_id=sbx.id)


def _abandon(sbx: Sandbox, d: Path, exc: BaseException) -> None:
    """A sandbox that could not be fenced must not run: destroy it, or at least stop
    it. Raises a ``SandboxError`` (from ``exc``) when it could not be destroyed."""
    try:
        sbx.destroy()
    except Exception as destroy_exc:  # noqa: BLE001 - reported below, with the cause
        try:
            sbx.stop()
        except Exception as stop_exc:  # noqa: BLE001 - reported below
            left = (f"destroying it failed ({destroy_exc}) and so did stopping it "
                    f"({stop_exc}); it has no way out, destroy it by hand")
        else:
            left = (f"destroying it failed ({destroy_exc}); it is stopped, not destroyed: "
                    "destroy it by hand")
        raise SandboxError(f"sandbox {sbx.id} could not be fenced ({exc}); {left}",
                           sandbox_id=sbx.id) from exc
    finally:
        _homes.pop(sbx.id, None)
    shutil.rmtree(d, ignore_errors=True)


def _policy_document(policy: Policy) -> dict[str, Any]:
    """A policy as a document ``load_policy`` reads back (None values left out)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    data: dict[str, Any] = clean(policy.model_dump(mode="json"))
    return data


#: sandbox id -> installation, for the sandboxes this process fenced (a Fence may
#: use another home than the default one)
_homes: dict[str, Path] = {}


def _on_compute_event(event: str, sandbox_id: str, details: dict[str, Any]) -> None:
    """Detach a destroyed sandbox at once (the daemon would notice within a second)."""
    if event != "sandbox.destroyed":
        return
    with contextlib.suppress(CorralError):
        home = _homes.pop(sandbox_id, None) or get_context().home
        d = fence_dir(home, sandbox_id)
        if not d.exists():
            return
        client = DaemonClient(home)
        if client.ping() is not None:
            with contextlib.suppress(CorralError):
                client.detach(sandbox_id, forget=True)
        shutil.rmtree(d, ignore_errors=True)


events.add_listener(_on_compute_event)
