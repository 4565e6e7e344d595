"""Installing the pinned agent CLIs: once per machine into a cache, reused by
every sandbox (exposed read-only), or into an environment prebuild's layer.

Where a CLI comes from (``agents.install`` in corral.yaml):

- ``auto`` (default): the cache, installing the pinned version on first use.
  The cache is ``$CORRAL_AGENTS_CACHE``, else ``/var/cache/corral-agents`` for
  root (a place every ``base: host`` sandbox sees read-only through the host
  root layer, so no per-sandbox mount is needed), else
  ``$XDG_CACHE_HOME/corral/agents`` (``~/.cache/corral/agents``). Each install
  is its own directory ``<name>-<version>`` with a ``.corral-install.json``
  record (time taken, size) written last, so a half-finished install is never
  used; a lock file makes concurrent callers wait for one install instead of
  racing. Sandboxes on other bases get the directory through ``expose``.
- ``host``: the copy on the host's PATH (only for ``base: host``, where the
  sandbox sees the host's /usr).
- ``layer``: the commands of ``layer_commands`` run as part of an environment's
  setup, so the CLI is sealed into the prebuild every task forks from.

Claude Code and Codex come from npm (their packages carry the native binary as
a platform dependency: no download at run time); Aider gets a venv of its own
built from the system Python, so the sandbox, which sees the host's /usr, can
run it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corral.errors import CorralError, MissingTool
from corral.harness.pins import Pin, pin_for

Progress = Callable[[str], None]

RECORD = ".corral-install.json"
_SEMVER = re.compile(r"\b(\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.-]+)?)\b")
#: where ``layer`` installs put the CLIs inside an environment
LAYER_ROOT = "/opt/corral-agents"


class InstallError(CorralError):
    """Installing an agent CLI failed; the message carries the client's last words."""


@dataclass(frozen=True)
class Installed:
    """One usable copy of an agent CLI."""

    name: str
    version: str
    #: the command to run (absolute path)
    binary: Path
    source: Literal["cache", "host", "layer"]
    #: the install directory (None for a host copy)
    prefix: Path | None = None
    seconds: float | None = None
    size_bytes: int | None = None
    installed_at: str | None = None
    #: host paths a sandbox must see (read-only) to run ``binary``
    expose: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "binary": str(self.binary),
                "source": self.source, "prefix": str(self.prefix) if self.prefix else None,
                "seconds": self.seconds, "size_bytes": self.size_bytes,
                "installed_at": self.installed_at, "expose": list(self.expose)}


def cache_root() -> Path:
    """The directory holding cached installs (not created)."""
    env = os.environ.get("CORRAL_AGENTS_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/cache/corral-agents")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().absolute() / "corral" / "agents"


def prefix_for(pin: Pin, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{pin.name}-{pin.version}"


def _binary_in(pin: Pin, prefix: Path) -> Path:
    if pin.kind == "npm":
        return prefix / "node_modules" / ".bin" / pin.binary
    return prefix / "bin" / pin.binary


def cached(name: str, *, version: str | None = None, root: Path | None = None) -> Installed | None:
    """The cached install of ``name`` (the pinned version unless told), or None."""
    pin = _pin(name, version)
    prefix = prefix_for(pin, root)
    rec = prefix / RECORD
    binary = _binary_in(pin, prefix)
    if not rec.is_file() or not binary.exists():
        return None
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        return None
    return Installed(name=pin.name, version=pin.version, binary=binary, source="cache",
                     prefix=prefix, seconds=data.get("seconds"),
                     size_bytes=data.get("size_bytes"), installed_at=data.get("installed_at"),
                     expose=(str(prefix),))


def install(name: str, *, version: str | None = None, root: Path | None = None,
            progress: Progress | None = None, timeout: float = 1800.0) -> Installed:
    """The cached install of ``name``, installing it first if needed.

    Blocks while the registry's client runs (minutes on a cold cache); reports
    through ``progress`` every few seconds. Concurrent callers (other test
    workers, other corral processes) wait for the one install. Raises
    ``MissingTool`` when npm or Python's venv is missing and ``InstallError``
    when the client fails; a failed install leaves nothing behind.
    """
    pin = _pin(name, version)
    say = progress or (lambda _m: None)
    have = cached(name, version=pin.version, root=root)
    if have:
        return have
    prefix = prefix_for(pin, root)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _open_up(prefix.parent, prefix.parent)
    with _locked(prefix.parent / f".{prefix.name}.lock"):
        have = cached(name, version=pin.version, root=root)
        if have:
            return have
        if prefix.exists():
            shutil.rmtree(prefix)  # an earlier install that never finished
        say(f"installing {pin.spec} from {pin.kind} into {prefix}")
        t0 = time.monotonic()
        try:
            with _ticker(say, prefix, t0):
                if pin.kind == "npm":
                    _install_npm(pin, prefix, timeout)
                else:
                    _install_venv(pin, prefix, timeout)
            if not _binary_in(pin, prefix).exists():
                raise InstallError(f"{pin.spec} installed but {pin.binary} is missing")
        except BaseException:
            shutil.rmtree(prefix, ignore_errors=True)
            raise
        seconds = round(time.monotonic() - t0, 1)
        size = tree_size(prefix)
        record = {"name": pin.name, "package": pin.package, "version": pin.version,
                  "seconds": seconds, "size_bytes": size,
                  "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        (prefix / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _open_up(prefix, prefix.parent)
        say(f"installed {pin.spec} in {seconds:.0f} s, {size / 1e6:.0f} MB")
    out = cached(name, version=pin.version, root=root)
    assert out is not None
    return out


def find_host(name: str) -> Installed | None:
    """The copy of ``name`` on the host's PATH, with the version it reports."""
    pin = pin_for(name)
    path = shutil.which(pin.binary)
    if not path:
        return None
    return Installed(name=pin.name, version=cli_version(Path(path)) or "unknown",
                     binary=Path(path), source="host")


def resolve(name: str, mode: str = "auto", *, progress: Progress | None = None) -> Installed:
    """The copy of ``name`` an adapter uses under ``agents.install: MODE``.

    ``auto`` installs into the cache when needed; ``host`` requires a copy on
    PATH (raising ``MissingTool`` with the install hint); ``layer`` means the
    environment already has it under ``LAYER_ROOT``.
    """
    pin = pin_for(name)
    if mode == "host":
        found = find_host(name)
        if found is None:
            raise MissingTool(f"{pin.binary} is not on PATH (agents.install: host); install "
                              f"{pin.spec} or use agents.install: auto")
        return found
    if mode == "layer":
        prefix = Path(LAYER_ROOT) / f"{pin.name}-{pin.version}"
        return Installed(name=pin.name, version=pin.version, binary=_binary_in(pin, prefix),
                         source="layer", prefix=prefix)
    return install(name, progress=progress)


def cli_version(binary: Path, timeout: float = 30.0) -> str | None:
    """The version ``binary --version`` prints (``2.1.197 (Claude Code)``,
    ``codex-cli 0.171.0``, ``aider 0.86.2``), or None when it does not run."""
    try:
        r = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                           timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _SEMVER.search(r.stdout or "") or _SEMVER.search(r.stderr or "")
    return m.group(1) if m else None


def layer_commands(name: str, *, version: str | None = None) -> list[str]:
    """Shell commands that install ``name`` under ``LAYER_ROOT`` inside an
    environment during its setup (root, with registry access through the fence),
    so the prebuild carries the CLI. The same layout as the cache."""
    pin = _pin(name, version)
    prefix = f"{LAYER_ROOT}/{pin.name}-{pin.version}"
    if pin.kind == "npm":
        return [f"mkdir -p {prefix} && npm install --prefix {prefix} --no-audit --no-fund "
                f"--no-update-notifier --loglevel=error '{pin.spec}'"]
    return [f"python3 -m venv {prefix}",
            f"{prefix}/bin/pip install --quiet --disable-pip-version-check '{pin.spec}'"]


def tree_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


# -- internals -------------------------------------------------------------------------

def _pin(name: str, version: str | None) -> Pin:
    pin = pin_for(name)
    if version and version != pin.version:
        pin = Pin(pin.name, pin.kind, pin.package, version, pin.binary)
    return pin


def _install_npm(pin: Pin, prefix: Path, timeout: float) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise MissingTool(f"npm is needed to install {pin.name}: apt-get install npm")
    prefix.mkdir(parents=True)
    _run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
          "--no-update-notifier", "--loglevel=error", "--progress=false", pin.spec],
         pin, timeout)


def _system_python() -> str:
    """An interpreter every sandbox on ``base: host`` can run: the one under /usr."""
    for cand in ("/usr/bin/python3", sys.executable):
        if cand and Path(cand).exists():
            return cand
    raise MissingTool("python3 is needed to install aider: apt-get install python3-venv")


def _install_venv(pin: Pin, prefix: Path, timeout: float) -> None:
    py = _system_python()
    _run([py, "-m", "venv", str(prefix)], pin, timeout)
    _run([str(prefix / "bin" / "python"), "-m", "pip", "install", "--quiet",
          "--disable-pip-version-check", pin.spec], pin, timeout)


def _run(argv: list[str], pin: Pin, timeout: float) -> None:
    env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           check=False)
    except subprocess.TimeoutExpired:
        raise InstallError(f"installing {pin.spec} took over {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()][-1:] or ["?"]
        raise InstallError(f"installing {pin.spec} failed ({' '.join(argv[:2])} exit "
                           f"{r.returncode}): {tail[0][:300]}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ticker(say: Progress, prefix: Path, t0: float, every: float = 10.0) -> Iterator[None]:
    """Report elapsed time and size so far while an install runs."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            size = tree_size(prefix) if prefix.exists() else 0
            say(f"  ... {time.monotonic() - t0:.0f} s, {size / 1e6:.0f} MB so far")

    t = threading.Thread(target=tick, name="install-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _open_up(path: Path, stop: Path) -> None:
    """Sandbox commands run as an unprivileged uid: the cache must be readable and
    its directories traversable by everyone (never writable). Walks from ``path``
    up to ``stop``, never above it."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = p.stat()
            if st.st_uid == os.geteuid() and (st.st_mode & 0o005) != 0o005:
                p.chmod(st.st_mode | 0o005)
        if p == stop or p == Path("/"):
            break


def check_agents(settings: Any) -> list[Any]:
    """``corral doctor`` rows: which agent CLIs are usable, and at which version.

    A CLI is usable when the cache holds its pinned version or the host has a
    copy on PATH; one that is neither is installed on first use when its
    registry client (npm, python3 -m venv) is there. A host copy at another
    version than the pin gets a warning: the adapters parse what the pinned
    version prints."""
    from corral.doctor import Check
    from corral.harness.pins import PINS

    rows = []
    for name, pin in PINS.items():
        have = cached(name)
        host = shutil.which(pin.binary)
        client = shutil.which("npm") if pin.kind == "npm" else _system_python()
        if have is not None:
            size = f", {have.size_bytes / 1e6:.0f} MB" if have.size_bytes else ""
            took = f", installed in {have.seconds:.0f} s" if have.seconds else ""
            rows.append(Check("agents", name, True,
                              f"{pin.version} (pinned) in {have.prefix}{took}{size}",
                              required=False))
        elif host:
            ver = cli_version(Path(host), timeout=10) or "unknown"
            same = ver == pin.version
            rows.append(Check("agents", name, same,
                              f"{ver} on the host ({host})" + ("" if same else
                                                               f"; corral is tested with "
                                                               f"{pin.version}"),
                              f"corral agents install {name} (pins {pin.spec})",
                              required=False))
        else:
            rows.append(Check("agents", name, client is not None,
                              f"not installed; {pin.spec} is installed on first use"
                              if client else f"not installed, and {pin.kind}'s client is "
                              "missing",
                              "apt-get install npm" if pin.kind == "npm" else
                              "apt-get install python3-venv", required=False))
    return rows
