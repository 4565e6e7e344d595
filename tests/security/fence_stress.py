"""Many fenced sandboxes created at once, and the checks every one of them must pass.

Used by ``test_concurrency.py``, and run as a script by it to create sandboxes
from other processes (each with several threads):

    python fence_stress.py POLICY COUNT [--home HOME]

waits for a line on stdin (so that every process starts at the same moment),
then prints one JSON line ``{"ids": [...], "errors": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: the real value the policy's secret TOKEN resolves to (env:CORRAL_TEST_TOKEN)
REAL = "real-secret-value-0123456789-abcdefXYZ"
RULES = """
- {host: api.example.test, methods: [GET], paths: ["/ok/**"], decision: allow}
- {host: api.example.test, methods: [DELETE], decision: deny, reason: "no deleting here"}
"""
SECRETS = """
secrets:
  TOKEN: {source: "env:CORRAL_TEST_TOKEN", hosts: [api.example.test]}
"""

#: run inside each sandbox: DNS through the stub, an allowed request carrying the
#: sentinel (over the explicit proxy and transparently), a denied one
CHECK = r"""
echo "dns=$(python3 -c 'import socket; print(socket.gethostbyname("api.example.test"))' 2>&1)"
echo "allowed=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 20 \
  -H "Authorization: Bearer $TOKEN" https://api.example.test/ok/stress/SID 2>&1)"
echo "transparent=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 20 --noproxy '*' \
  -H "Authorization: Bearer $TOKEN" https://api.example.test/ok/stress-t/SID 2>&1)"
echo "denied=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 20 -X DELETE \
  https://api.example.test/ok/stress/SID 2>&1)"
"""


def create_many(policy: Path, count: int, home: Path | None = None
                ) -> tuple[list[str], list[str]]:
    """``count`` fenced sandboxes created at once, one thread each -> (ids, errors)."""
    from corral.security.fence import Fence

    go = threading.Barrier(count)
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        fence = Fence.from_file(policy, home=home)
        go.wait()
        try:
            sbx = fence.create_sandbox()
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            ids.append(sbx.id)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids, errors


def create_concurrently(policy: Path, home: Path, *, processes: int, per_process: int,
                        local: int, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Fenced sandboxes from ``processes`` processes of ``per_process`` threads each and
    ``local`` threads of this process, all started at the same moment."""
    procs = [subprocess.Popen([sys.executable, __file__, str(policy), str(per_process),
                               "--home", str(home)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)
             for _ in range(processes)]
    try:
        # each process says it is ready (imports done) before anyone starts
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        local_result: list[tuple[list[str], list[str]]] = []
        t = threading.Thread(target=lambda: local_result.append(
            create_many(policy, local, home) if local else ([], [])))
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        t.start()
        ids: list[str] = []
        errors: list[str] = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            lines = out.strip().splitlines()
            if p.returncode != 0 or not lines:
                errors.append(f"creator process exited {p.returncode}")
                continue
            got = json.loads(lines[-1])
            ids += got["ids"]
            errors += got["errors"]
        t.join()
        ids += local_result[0][0]
        errors += local_result[0][1]
        return ids, errors
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_sandbox(sbx: Any, upstream: Any, home: Path) -> list[str]:
    """What is wrong with one fenced sandbox (empty: nothing). Checks, from inside it:
    DNS answers, allowed HTTPS works (explicit and transparent) and the upstream sees
    the real secret, a denied request is denied; and from the host: the daemon's
    listeners are in this sandbox's network namespace."""
    from corral.security.daemon import DaemonClient
    from corral.security.netns import netns_id

    problems: list[str] = []
    r = sbx.commands.run(CHECK.replace("SID", sbx.id), timeout=120)
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if not out.get("dns", "").startswith(("198.18.", "198.19.")):
        problems.append(f"DNS: {out.get('dns')!r}")
    for key in ("allowed", "transparent"):
        if out.get(key) != "200":
            problems.append(f"{key} request: {out.get(key)!r} {r.stderr.strip()[:200]}")
    if out.get("denied") != "403":
        problems.append(f"denied request: {out.get('denied')!r}")
    for path in (f"/ok/stress/{sbx.id}", f"/ok/stress-t/{sbx.id}"):
        seen = upstream.seen(path)
        auth = seen[-1].headers.get("authorization") if seen else None
        if auth != f"Bearer {REAL}":
            problems.append(f"secret not swapped on {path}: upstream saw {auth!r}")
    info = DaemonClient(home).status()["sandboxes"].get(sbx.id)
    want = str(netns_id(sbx.netns_path))
    if info is None:
        problems.append("not attached to the daemon")
    else:
        if info["netns"] != want:
            problems.append(f"attached to {info['netns']}, the sandbox is in {want}")
        wrong = {k: v for k, v in info["listeners"].items() if v != want}
        if wrong or len(info["listeners"]) != 4:
            problems.append(f"listeners {info['listeners']}, the sandbox is in {want}")
        if info["errors"]:
            problems.append(f"attachment errors: {info['errors']}")
    return problems


def injected(home: Path, ids: list[str], timeout: float = 10.0) -> set[str]:
    """The sandboxes of ``ids`` with two ``secret.injected`` records in the audit log."""
    from corral.security.audit import AuditLog

    log = AuditLog.for_home(home)
    deadline = time.monotonic() + timeout
    while True:
        counts: dict[str, int] = {}
        for rec in log.records():
            if rec.event == "secret.injected" and rec.sandbox in ids:
                counts[rec.sandbox] = counts.get(rec.sandbox, 0) + 1
        done = {sid for sid, n in counts.items() if n >= 2}
        if done == set(ids) or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("policy", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args(argv)
    import corral.security.fence  # noqa: F401 - the imports before the start line

    print("ready", flush=True)
    sys.stdin.readline()
    ids, errors = create_many(args.policy, args.count, args.home)
    print(json.dumps({"ids": ids, "errors": errors}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
