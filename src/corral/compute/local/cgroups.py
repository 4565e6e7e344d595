"""cgroup limits, freezing and killing, on v2-only and hybrid (v1 + v2) hosts.

Hybrid hosts (this machine kind) keep every resource controller on v1
(``/sys/fs/cgroup/<controller>``) and only ``cgroup.freeze`` / ``cgroup.kill`` on
the v2 tree (``/sys/fs/cgroup/unified``). A sandbox gets one cgroup in each
hierarchy it needs; a process joins all of them before it execs.

Each sandbox's cgroups nest under the cgroup of the process that created it
(plus ``corral/``), so a host that confines corral keeps confining its sandboxes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.compute.types import Limits
from corral.errors import MissingTool, SandboxError

CGROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "cpu", "pids")
_CPU_PERIOD = 100_000


def _read_self_cgroups() -> dict[str, str]:
    """controller (or '' for v2) -> path of this process's cgroup."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def _mounts() -> dict[str, Path]:
    """'v2' -> unified mount, and each v1 controller -> its mount."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, opts = right.split(" ", 2)
        mnt = Path(left.split(" ")[4])
        if fstype == "cgroup2":
            found.setdefault("v2", mnt)
        elif fstype == "cgroup":
            for opt in opts.split(" ")[-1].split(","):
                if opt in (*_V1_CONTROLLERS, "freezer", "cpuacct"):
                    found.setdefault(opt, mnt)
    return found


@dataclass
class Cgroups:
    """The cgroup directories of one sandbox, one per hierarchy in use."""

    #: hierarchy name ('v2', 'memory', 'cpu', 'pids', 'freezer') -> directory
    dirs: dict[str, str] = field(default_factory=dict)
    #: which hierarchy freezes and kills: 'v2' or 'freezer' (v1)
    freezer: str = "v2"

    def to_json(self) -> dict[str, Any]:
        return {"dirs": dict(self.dirs), "freezer": self.freezer}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cgroups:
        return cls(dirs=dict(data.get("dirs", {})), freezer=data.get("freezer", "v2"))

    # -- joining -------------------------------------------------------------
    def open_procs(self) -> list[int]:
        """fds on every ``cgroup.procs``, to write "0" to from a child before exec."""
        fds = []
        try:
            for d in self.dirs.values():
                fds.append(os.open(Path(d) / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    # -- freezing --------------------------------------------------------------
    def freeze(self, timeout: float = 5.0) -> None:
        d = Path(self.dirs[self.freezer])
        if self.freezer == "v2":
            (d / "cgroup.freeze").write_text("1")
            _wait(lambda: "frozen 1" in (d / "cgroup.events").read_text(), timeout,
                  "freezing the sandbox")
        else:
            (d / "freezer.state").write_text("FROZEN")
            _wait(lambda: (d / "freezer.state").read_text().strip() == "FROZEN", timeout,
                  "freezing the sandbox")

    def thaw(self) -> None:
        d = Path(self.dirs[self.freezer])
        if self.freezer == "v2":
            (d / "cgroup.freeze").write_text("0")
        else:
            (d / "freezer.state").write_text("THAWED")

    def frozen(self) -> bool:
        d = Path(self.dirs[self.freezer])
        if self.freezer == "v2":
            return "frozen 1" in (d / "cgroup.events").read_text()
        return (d / "freezer.state").read_text().strip() != "THAWED"

    # -- members ---------------------------------------------------------------
    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(FileNotFoundError):
                seen.update(int(x) for x in (Path(d) / "cgroup.procs").read_text().split())
        return sorted(seen)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process, frozen or not, and wait until none is left."""
        if not any(Path(d).exists() for d in self.dirs.values()):
            return
        v2 = self.dirs.get("v2")
        if v2 and (Path(v2) / "cgroup.kill").exists():
            with contextlib.suppress(FileNotFoundError):
                (Path(v2) / "cgroup.kill").write_text("1")
        else:
            # v1 only: freeze so nothing forks while we kill, kill, thaw to let them die
            with contextlib.suppress(OSError, SandboxError):
                self.freeze()
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            with contextlib.suppress(OSError):
                self.thaw()
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.pids():
            if time.monotonic() > deadline:
                raise SandboxError(f"processes survived SIGKILL: {self.pids()}")
            if not v2:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            _reap_children()
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        _reap_children()

    def remove(self) -> None:
        """Delete the directories (after ``kill``)."""
        for d in self.dirs.values():
            p = Path(d)
            for _ in range(200):
                try:
                    p.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    _reap_children()
                    time.sleep(0.005)

    def exists(self) -> bool:
        return all(Path(d).is_dir() for d in self.dirs.values())

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        mem = self.dirs.get("memory")
        v2 = self.dirs.get("v2")
        with contextlib.suppress(OSError, ValueError):
            if mem:
                out["memory_bytes"] = int((Path(mem) / "memory.usage_in_bytes").read_text())
            elif v2 and (Path(v2) / "memory.current").exists():
                out["memory_bytes"] = int((Path(v2) / "memory.current").read_text())
        out["pids"] = len(self.pids())
        return out


def _reap_children() -> None:
    """Collect launchers of killed sandboxes that are this process's own children.

    Only children corral started itself are polled (never ``waitpid(-1)``, which
    would steal other code's children).
    """
    from corral.compute.commands import reap_all

    reap_all()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not pred():
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


class CgroupDriver:
    """Finds the host's cgroup layout and makes sandbox cgroups in it."""

    def __init__(self) -> None:
        mounts = _mounts()
        self.mounts = mounts
        own = _read_self_cgroups()
        v2 = mounts.get("v2")
        self.layout = "none"
        self.hierarchies: dict[str, Path] = {}
        if v2 is not None:
            v2_ctrls = set((v2 / "cgroup.controllers").read_text().split())
            if {"memory", "pids", "cpu"} <= v2_ctrls or not any(
                c in mounts for c in _V1_CONTROLLERS
            ):
                self.layout = "v2"
            else:
                self.layout = "hybrid"
            self.hierarchies["v2"] = v2 / own.get("", "/").lstrip("/") / "corral"
        elif any(c in mounts for c in _V1_CONTROLLERS):
            self.layout = "v1"
        if self.layout in ("hybrid", "v1"):
            for c in (*_V1_CONTROLLERS, "freezer"):
                if c == "freezer" and self.layout == "hybrid":
                    continue
                if c in mounts:
                    self.hierarchies[c] = mounts[c] / own.get(c, "/").lstrip("/") / "corral"
        v2_dir = self.hierarchies.get("v2")
        self.v2_freeze = bool(v2 is not None and v2_dir is not None)
        self.freezer = "v2" if self.v2_freeze else "freezer"

    def describe(self) -> str:
        return {
            "v2": "cgroup v2 (limits, freeze and kill on one tree)",
            "hybrid": "hybrid: limits on cgroup v1, freeze and kill on cgroup v2",
            "v1": "cgroup v1 only (freezer v1, kill by signal)",
            "none": "no cgroups",
        }[self.layout]

    def create(self, name: str, limits: Limits) -> Cgroups:
        """Make the sandbox's cgroups and write its limits. Raises ``MissingTool``."""
        if self.layout == "none":
            raise MissingTool("no cgroup filesystem is mounted under /sys/fs/cgroup")
        cg = Cgroups(freezer=self.freezer)
        try:
            for h, parent in self.hierarchies.items():
                if h == "v2":
                    self._prepare_v2_parent(parent)
                else:
                    parent.mkdir(exist_ok=True)
                d = parent / name
                d.mkdir(exist_ok=True)
                cg.dirs[h] = str(d)
            self._apply(cg, limits)
        except OSError as exc:
            with contextlib.suppress(OSError):
                cg.remove()
            raise SandboxError(f"cannot set up cgroups for {name}: {exc}") from exc
        return cg

    def find(self, name: str) -> Cgroups:
        """The cgroups ``create(name)`` made, those that exist (cleanup after a crash)."""
        cg = Cgroups(freezer=self.freezer)
        for h, parent in self.hierarchies.items():
            if (parent / name).is_dir():
                cg.dirs[h] = str(parent / name)
        return cg

    def _prepare_v2_parent(self, parent: Path) -> None:
        parent.mkdir(exist_ok=True)
        if self.layout != "v2":
            return
        # enable the controllers on the way down (root's subtree_control is ours to set)
        want = {"memory", "pids", "cpu"}
        node = parent.parent
        chain = []
        while node != self.mounts["v2"].parent and node.is_relative_to(self.mounts["v2"]):
            chain.append(node)
            if node == self.mounts["v2"]:
                break
            node = node.parent
        for n in [*reversed(chain), parent]:
            have = set((n / "cgroup.controllers").read_text().split())
            on = set((n / "cgroup.subtree_control").read_text().split())
            missing = (want & have) - on
            if missing:
                with contextlib.suppress(OSError):
                    (n / "cgroup.subtree_control").write_text(
                        " ".join(f"+{c}" for c in sorted(missing)))

    def _apply(self, cg: Cgroups, limits: Limits) -> None:
        if self.layout == "v2":
            d = Path(cg.dirs["v2"])
            if limits.memory is not None:
                (d / "memory.max").write_text(str(limits.memory))
                with contextlib.suppress(OSError):
                    (d / "memory.swap.max").write_text("0")
            if limits.cpus is not None:
                (d / "cpu.max").write_text(f"{int(limits.cpus * _CPU_PERIOD)} {_CPU_PERIOD}")
            if limits.pids is not None:
                (d / "pids.max").write_text(str(limits.pids))
            return
        if limits.memory is not None and "memory" in cg.dirs:
            d = Path(cg.dirs["memory"])
            (d / "memory.limit_in_bytes").write_text(str(limits.memory))
            with contextlib.suppress(OSError):
                (d / "memory.memsw.limit_in_bytes").write_text(str(limits.memory))
        if limits.cpus is not None and "cpu" in cg.dirs:
            d = Path(cg.dirs["cpu"])
            (d / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD))
            (d / "cpu.cfs_quota_us").write_text(str(int(limits.cpus * _CPU_PERIOD)))
        if limits.pids is not None and "pids" in cg.dirs:
            (Path(cg.dirs["pids"]) / "pids.max").write_text(str(limits.pids))
