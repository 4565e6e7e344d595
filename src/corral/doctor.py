"""``corral doctor``: what this machine offers corral, and what to install.

Each check is a function returning ``Check`` rows; later layers append their own
(proxy, harness adapters) to ``CHECKS``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.settings import Settings


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: False for optional features: a missing one does not make doctor fail
    required: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"area": self.area, "name": self.name, "ok": self.ok, "detail": self.detail,
                "fix": self.fix, "required": self.required}


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else ""


def check_tools(settings: Settings) -> list[Check]:
    from corral.compute.local import TOOLS

    out = []
    for tool, pkg in {**TOOLS, "git": "git", "mkfs.btrfs": "btrfs-progs",
                      "nft": "nftables"}.items():
        path = shutil.which(tool)
        required = tool not in ("mkfs.btrfs", "nft")
        ver = _version([tool, "-V" if tool == "ip" else "--version"]) if path else ""
        out.append(Check("tools", tool, path is not None, ver or (path or "not found"),
                         "" if path else f"apt-get install {pkg}", required))
    return out


def check_kernel(settings: Settings) -> list[Check]:
    out = [Check("kernel", "kernel", True, platform.release())]
    out.append(Check("kernel", "root", os.geteuid() == 0,
                     "running as root" if os.geteuid() == 0 else "not root",
                     "the local provider mounts and makes namespaces: run as root"))
    fs = Path("/proc/filesystems").read_text()
    out.append(Check("kernel", "overlayfs", "overlay" in fs, "overlay in /proc/filesystems"
                     if "overlay" in fs else "missing", "modprobe overlay"))
    out.append(Check("kernel", "btrfs", "btrfs" in fs, "available" if "btrfs" in fs else
                     "missing (snapshots fall back to copies)", "modprobe btrfs", False))
    try:
        n = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        n = 0
    out.append(Check("kernel", "user namespaces", n > 0, f"max_user_namespaces={n}",
                     "sysctl user.max_user_namespaces=10000 (needed for root inside)", False))
    kvm = Path("/dev/kvm").exists()
    out.append(Check("kernel", "kvm", kvm, "/dev/kvm present" if kvm else "absent",
                     "the microvm provider needs KVM", False))
    return out


def check_cgroups(settings: Settings) -> list[Check]:
    from corral.compute.local.cgroups import CgroupDriver

    try:
        d = CgroupDriver()
    except OSError as exc:
        return [Check("cgroups", "layout", False, str(exc), "mount cgroup2 at /sys/fs/cgroup")]
    return [Check("cgroups", "layout", d.layout != "none", d.describe(),
                  "mount cgroup2 at /sys/fs/cgroup"),
            Check("cgroups", "freezer", bool(d.hierarchies), f"pause uses {d.freezer}")]


def check_storage(settings: Settings) -> list[Check]:
    import json

    rec = settings.home / "storage.json"
    if rec.exists():
        kind = json.loads(rec.read_text())["kind"]
        detail = {"btrfs-loop": f"btrfs pool {settings.home / 'storage.img'} (loop-mounted)",
                  "btrfs": "btrfs (the state dir's own filesystem)",
                  "copy": "copy fallback: snapshot cost grows with changed data"}[kind]
        return [Check("storage", "snapshots", True, detail,
                      "" if kind != "copy" else "apt-get install btrfs-progs, then use a new "
                      "CORRAL_HOME", True)]
    from corral.compute.local.storage import _choose

    try:
        kind = _choose(settings, settings.home / "storage")
    except Exception as exc:  # noqa: BLE001 - report, do not crash, whatever went wrong
        return [Check("storage", "snapshots", False, str(exc))]
    return [Check("storage", "snapshots", True,
                  f"will use {kind} on first sandbox (state dir {settings.home})")]


def check_agents(settings: Settings) -> list[Check]:
    """Which agent CLIs (Layer 4) are usable, and at which versions."""
    from corral.harness.install import check_agents as agents

    return agents(settings)


CHECKS: list[Callable[[Settings], list[Check]]] = [
    check_kernel, check_tools, check_cgroups, check_storage, check_agents,
]


def run_checks(settings: Settings | None = None) -> list[Check]:
    settings = settings or Settings.from_env()
    out: list[Check] = []
    for fn in CHECKS:
        try:
            out.extend(fn(settings))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the rest
            out.append(Check("doctor", fn.__name__, False, f"check crashed: {exc}"))
    return out
