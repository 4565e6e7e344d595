"""Layer 1 benchmark: sandbox start, exec, pause, snapshots, footprint and leaks.

Prints one JSON document. Every figure comes with a baseline measured in the
same run (bwrap's floor, podman, tar), medians of >= 20 runs. Runs in its own
temporary CORRAL_HOME and removes everything it made.

    python bench/sandbox.py [--runs 20] [--skip-podman]

The podman baseline runs `podman run --rm --network none` of an image imported
from the same root filesystem corral's image-based sandbox uses (a Debian
minbase made by debootstrap, cached under $XDG_CACHE_HOME/corral-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "corral-bench"
PODMAN = ["podman", "--log-level=error", "--runtime", "runc"]
PODMAN_RUN = ["run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000",
              "--ulimit", "nproc=4096:4096"]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def median_of(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_tree(root: Path, files: int, size: int = 4096) -> None:
    """``files`` files of ``size`` bytes in directories of 100."""
    blob = os.urandom(size)
    for i in range(files):
        d = root / f"d{i // 100}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(blob)


def minbase() -> Path:
    """A Debian minbase root filesystem (cached)."""
    target = CACHE / "minbase"
    if (target / "usr" / "bin" / "true").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "minbase.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print("bench: building a Debian minbase with debootstrap (once)...", file=sys.stderr)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp)], check=True,
                   stdout=subprocess.DEVNULL)
    tmp.rename(target)
    return target


def podman_baseline(rootfs: Path, runs: int) -> float | None:
    if shutil.which("podman") is None:
        return None
    tar = CACHE / "minbase.tar"
    if not tar.exists():
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    have = subprocess.run([*PODMAN, "image", "exists", "corral-bench-minbase"], check=False)
    if have.returncode != 0:
        subprocess.run([*PODMAN, "import", str(tar), "corral-bench-minbase"], check=True,
                       stdout=subprocess.DEVNULL)
    run = [*PODMAN, *PODMAN_RUN, "corral-bench-minbase", "/usr/bin/true"]
    subprocess.run(run, check=True)  # warm
    return median_of(lambda: timed(lambda: subprocess.run(run, check=True)), runs)


def rss_kb(pid: int) -> tuple[int, int]:
    """(RSS, private) of a process in KiB."""
    rss = priv = 0
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k == "Rss":
            rss = int(v.split()[0])
        elif k in ("Private_Clean", "Private_Dirty"):
            priv += int(v.split()[0])
    return rss, priv


def leak_count(home: Path, ids: set[str]) -> dict[str, int]:
    """What is left of the sandboxes ``ids`` of ``home``: mounts, netns, cgroups, loops."""
    mounts = sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if str(home) in line)
    netns = len(list((home / "sandboxes").glob("*/netns"))) if (home / "sandboxes").exists() \
        else 0
    from corral.compute.local.cgroups import CgroupDriver

    cgroups = sum(1 for parent in CgroupDriver().hierarchies.values() for sid in ids
                  if (parent / f"corral-{sid}").exists())
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return {"mounts": mounts, "netns": netns, "cgroups": cgroups,
            "loop_devices": loops.count(str(home))}


def all_ids() -> set[str]:
    from corral import Sandbox

    return {s.id for s in Sandbox.list(include_destroyed=True)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-podman", action="store_true")
    args = ap.parse_args()
    runs = max(args.runs, 20)
    home = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    os.environ["CORRAL_HOME"] = str(home)
    from corral import Sandbox
    from corral.compute import environment
    from corral.compute.local.storage import release

    out: dict[str, Any] = {"runs": runs}
    made: list[Sandbox] = []
    try:
        # -- floors and start ---------------------------------------------------------
        floor = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"]
        out["bwrap_floor_ms"] = ms(median_of(
            lambda: timed(lambda: subprocess.run(floor, check=True)), runs))
        Sandbox.create().destroy()  # pool, mask layer, first-use costs

        def create_first() -> float:
            t = time.perf_counter()
            s = Sandbox.create()
            s.commands.run(["true"])
            dt = time.perf_counter() - t
            s.destroy()
            return dt

        out["create_first_cmd_ms"] = ms(median_of(create_first, runs))
        if not args.skip_podman:
            rootfs = minbase()
            environment.import_image(rootfs, "bench-minbase")

            def create_first_image() -> float:
                t = time.perf_counter()
                s = Sandbox.create(base="bench-minbase")
                s.commands.run(["/usr/bin/true"])
                dt = time.perf_counter() - t
                s.destroy()
                return dt

            Sandbox.create(base="bench-minbase").destroy()
            out["create_first_cmd_image_ms"] = ms(median_of(create_first_image, runs))
            pod = podman_baseline(rootfs, runs)
            out["podman_run_ms"] = ms(pod) if pod is not None else None
            if pod:
                out["create_vs_podman"] = round(out["create_first_cmd_image_ms"] / ms(pod), 3)
        out["create_vs_floor"] = round(out["create_first_cmd_ms"] / out["bwrap_floor_ms"], 2)

        # -- exec, pause ---------------------------------------------------------------
        sbx = Sandbox.create()
        made.append(sbx)
        sbx.commands.run(["true"])
        out["exec_ms"] = ms(median_of(lambda: timed(lambda: sbx.commands.run(["true"])), runs))
        out["exec_shell_ms"] = ms(median_of(lambda: timed(lambda: sbx.commands.run("true")),
                                            runs))
        out["exec_vs_floor"] = round(out["exec_ms"] / out["bwrap_floor_ms"], 2)
        sbx.commands.run("while :; do :; done", background=True)
        p, u = [], []
        for _ in range(runs):
            p.append(timed(sbx.pause))
            u.append(timed(sbx.unpause))
        out["pause_ms"] = ms(statistics.median(p))
        out["unpause_ms"] = ms(statistics.median(u))

        # -- idle footprint -----------------------------------------------------------
        idle = Sandbox.create()
        made.append(idle)
        time.sleep(0.2)
        from corral.compute.local.cgroups import Cgroups

        cg = Cgroups.from_json(idle._row().runtime["cgroups"])
        rss = priv = 0
        for pid in cg.pids():
            r, pv = rss_kb(pid)
            rss += r
            priv += pv
        out["idle_processes"] = len(cg.pids())
        out["idle_rss_mb"] = round(rss / 1024, 2)
        out["idle_private_mb"] = round(priv / 1024, 2)

        # -- snapshots of 10k changed files ----------------------------------------------
        work = Path(tempfile.mkdtemp(prefix="corral-bench-tree-"))
        make_tree(work / "tree", 10_000)
        tar_s = median_of(lambda: timed(lambda: subprocess.run(
            ["tar", "-C", str(work), "-cf", str(work / "t.tar"), "tree"], check=True)), runs)
        out["tar_10k_ms"] = ms(tar_s)
        big = Sandbox.create()
        made.append(big)
        # the same 10,000 files, written by a process inside the sandbox
        big.commands.run(
            "python3 -c \"import os\nb=os.urandom(4096)\nfor i in range(10000):\n"
            " d=f'/workspace/tree/d{i//100}'\n os.makedirs(d, exist_ok=True)\n"
            " open(f'{d}/f{i}','wb').write(b)\"")
        assert big.commands.run("ls /workspace/tree | wc -l").stdout.strip() == "100"
        snaps = []

        def snap() -> float:
            t = time.perf_counter()
            snaps.append(big.snapshot())
            return time.perf_counter() - t

        out["snapshot_10k_ms"] = ms(median_of(snap, runs))
        out["restore_10k_ms"] = ms(median_of(lambda: timed(lambda: big.restore(snaps[0])),
                                             runs))
        assert big.commands.run("ls /workspace/tree/d99 | wc -l").stdout.strip() == "100"

        def fork() -> float:
            t = time.perf_counter()
            f = Sandbox.fork(snaps[0])[0]
            dt = time.perf_counter() - t
            f.destroy()
            return dt

        out["fork_10k_ms"] = ms(median_of(fork, runs))
        for k in ("snapshot_10k_ms", "restore_10k_ms", "fork_10k_ms"):
            out[k.replace("_ms", "_vs_tar")] = round(out[k] / out["tar_10k_ms"], 3)
        for s in snaps:
            Sandbox.delete_snapshot(s)
        shutil.rmtree(work)

        # -- snapshot growth with unchanged files below ------------------------------------
        growth = {}
        for n in (1_000, 100_000):
            w = Path(tempfile.mkdtemp(prefix="corral-bench-below-"))
            (w / "repo").mkdir()
            make_tree(w / "repo" / "tree", n, size=64)
            base = Sandbox.create(workspace=w / "repo")
            base.stop()
            below = base.snapshot()  # n files sealed below
            top = Sandbox.fork(below)[0]
            top.commands.run("echo change > /workspace/one")
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s = top.snapshot()
                times.append(time.perf_counter() - t)
                Sandbox.delete_snapshot(s)
            growth[n] = statistics.median(times)
            top.destroy()
            base.destroy()
            shutil.rmtree(w)
        out["snapshot_1k_below_ms"] = ms(growth[1_000])
        out["snapshot_100k_below_ms"] = ms(growth[100_000])
        out["snapshot_growth_1k_to_100k"] = round(growth[100_000] / growth[1_000], 3)

        # -- 20 busy sandboxes on 2 cores ---------------------------------------------------
        crowd = []
        t = time.perf_counter()
        for _ in range(20):
            s = Sandbox.create(metadata={"bench": "crowd"})
            s.commands.run("while :; do :; done", background=True)
            crowd.append(s)
        out["create_20_busy_s"] = round(time.perf_counter() - t, 3)
        lat = []
        ok = True
        for s in crowd:
            t = time.perf_counter()
            r = s.commands.run(["echo", "ok"], timeout=30)
            lat.append(time.perf_counter() - t)
            ok = ok and r.stdout == "ok\n"
        out["concurrent_20_ok"] = ok
        out["concurrent_20_exec_p50_ms"] = ms(statistics.median(lat))
        out["concurrent_20_exec_max_ms"] = ms(max(lat))
        for s in crowd:
            s.destroy()
        for s in made:
            s.destroy()
        made.clear()
        ids = all_ids()
        leaks_live = leak_count(home, ids)
        # the pool itself is one mount and one loop device until released
        out["leaks"] = leaks_live["netns"] + leaks_live["cgroups"] + max(
            0, leaks_live["mounts"] - 1) + max(0, leaks_live["loop_devices"] - 1)
        out["leak_detail"] = leaks_live
        out["storage"] = json.loads((home / "storage.json").read_text())["kind"]
    finally:
        for s in made:
            try:
                s.destroy()
            except Exception as exc:
                print(f"bench: cleanup {s.id}: {exc}", file=sys.stderr)
        ids = all_ids() if (home / "corral.db").exists() else set()
        release(home)
        after = leak_count(home, ids)
        out["leaks_after_release"] = sum(after.values())
        shutil.rmtree(home, ignore_errors=True)
    targets = {
        "create_first_cmd_ms <= 50": out.get("create_first_cmd_ms", 1e9) <= 50,
        "create <= 0.3x podman": out.get("create_vs_podman", 0) <= 0.3
        if out.get("create_vs_podman") is not None else None,
        "exec <= 3x floor": out.get("exec_vs_floor", 1e9) <= 3,
        "pause, unpause <= 10 ms": max(out.get("pause_ms", 1e9), out.get("unpause_ms", 1e9))
        <= 10,
        "snapshot/restore/fork_10k <= 50 ms": max(out.get(k, 1e9) for k in (
            "snapshot_10k_ms", "restore_10k_ms", "fork_10k_ms")) <= 50,
        "snapshot/restore/fork_10k <= 0.5x tar": max(out.get(k, 1e9) for k in (
            "snapshot_10k_vs_tar", "restore_10k_vs_tar", "fork_10k_vs_tar")) <= 0.5,
        "snapshot growth <= 2x": out.get("snapshot_growth_1k_to_100k", 1e9) <= 2,
        "idle rss <= 5 MB": out.get("idle_rss_mb", 1e9) <= 5,
        "20 concurrent ok": out.get("concurrent_20_ok") is True,
        "no leaks": out.get("leaks", 1) == 0 and out.get("leaks_after_release", 1) == 0,
    }
    out["targets_met"] = targets
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
