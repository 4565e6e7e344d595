"""Benchmark of corral's egress proxy, side by side with a direct connection and
with mitmproxy 12, against one loopback HTTPS upstream with keep-alive.

    .venv/bin/python bench/proxy.py            # needs root (it makes a real sandbox)

corral is measured end to end: the load generator runs inside a real fenced
sandbox and goes through the daemon's listener in the sandbox's namespace,
HTTPS intercepted with the sandbox's CA and the upstream verified. The direct
and mitmproxy runs use the same load generator (bench/proxy_client.py) on the
host. mitmproxy is installed by this script into its own venv under
``~/.cache/corral-bench`` (it needs Python >= 3.12; a pyenv or system one is
looked for), never into corral's environment. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "proxy_client.py"
HOST = "bench.example.test"
MITM_VERSION = ">=12,<13"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corral-bench"
ONE_KB = b"x" * 1024
HUNDRED_MB = 100 * 1024 * 1024
#: downloads of 100 MB per path (direct, through corral), taken in turns
DOWNLOAD_RUNS = 5


# -- the upstream (a separate process) ---------------------------------------------------
async def _serve_upstream(cert: str, key: str) -> None:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    chunk = b"y" * (1 << 20)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/100m":
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                            b"content-length: %d\r\n\r\n" % HUNDRED_MB)
                    for _ in range(HUNDRED_MB // len(chunk)):
                        w.write(chunk)
                        await w.drain()
                else:
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                            b"content-length: 1024\r\n\r\n" + ONE_KB)
                    await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# -- helpers --------------------------------------------------------------------------------
def _client(args: list[str], *, sbx: Any = None, timeout: float = 300) -> dict[str, Any]:
    if sbx is not None:
        r = sbx.commands.run(["python3", "/tmp/proxy_client.py", *args], timeout=timeout)
        out, err, code = r.stdout, r.stderr, r.exit_code
    else:
        p = subprocess.run(["python3", str(CLIENT), *args], capture_output=True, text=True,
                           timeout=timeout, check=False)
        out, err, code = p.stdout, p.stderr, p.returncode
    if code != 0:
        log = Path(os.environ["CORRAL_HOME"]) / "fence" / "proxy.log"
        tail = log.read_text()[-1500:] if log.exists() else ""
        raise RuntimeError(f"load generator failed ({args[0]}): {err.strip()[-500:]}\n{tail}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _idle(args: list[str], pid: int, *, sbx: Any = None, n: int = 1000) -> float:
    """RSS growth of process ``pid`` while ``n`` kept-alive connections sit idle."""
    before = _rss_mb(pid)
    if sbx is not None:
        h = sbx.commands.run(["python3", "/tmp/proxy_client.py", "idle", *args, "--n", str(n)],
                             background=True)
        deadline = time.monotonic() + 120
        while b'"open"' not in h.stdout() and time.monotonic() < deadline:
            if h.exit_code() is not None:
                raise RuntimeError(f"idle client ended: {h.stderr().decode()[-500:]}")
            time.sleep(0.1)
        time.sleep(1.0)
        after = _rss_mb(pid)
        h.kill()
        return after - before
    p = subprocess.Popen(["python3", str(CLIENT), "idle", *args, "--n", str(n)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    if '"open"' not in line:
        p.kill()
        raise RuntimeError("idle client failed")
    time.sleep(1.0)
    after = _rss_mb(pid)
    p.stdin.close()
    p.wait(30)
    return after - before


def _python312() -> str | None:
    for cand in ("python3.13", "python3.12"):
        path = shutil.which(cand)
        if path:
            return path
    pyenv = Path.home() / ".pyenv" / "versions"
    if pyenv.is_dir():
        for d in sorted(pyenv.iterdir(), reverse=True):
            if d.name.startswith(("3.12", "3.13", "3.14")) and (d / "bin" / "python").exists():
                return str(d / "bin" / "python")
    return None


def _mitmdump() -> str | None:
    venv = CACHE / "mitmproxy-12"
    exe = venv / "bin" / "mitmdump"
    if exe.exists():
        return str(exe)
    py = _python312()
    if py is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"mitmproxy{MITM_VERSION}"],
                   check=True)
    return str(exe)


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the run ----------------------------------------------------------------------------------
def run(with_mitmproxy: bool = True) -> dict[str, Any]:
    import trustme

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="corral-bench-proxy-"))
    home = work / "home"
    os.environ["CORRAL_HOME"] = str(home)
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    ca_file = work / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(work / "cert.pem"),
                                 str(work / "key.pem")], stdout=subprocess.PIPE, text=True)
    assert upstream.stdout is not None
    port = int(upstream.stdout.readline())
    policy = work / "policy.yaml"
    policy.write_text(f"network:\n  default: deny\n  rules:\n"
                      f"    - {{host: {HOST}, methods: [GET], decision: allow}}\n"
                      f"upstreams:\n  resolve: {{\"{HOST}\": \"127.0.0.1:{port}\"}}\n"
                      f"  extra_ca: {ca_file}\n")
    target = ["--host", HOST, "--port", str(port)]
    direct = [*target, "--addr", "127.0.0.1", "--ca", str(ca_file)]
    out: dict[str, Any] = {}
    mitm: subprocess.Popen[bytes] | None = None
    sbx = None
    try:
        from corral.security.daemon import DaemonClient
        from corral.security.fence import Fence

        sbx = Fence.from_file(policy).create_sandbox()
        sbx.files.write("/tmp/proxy_client.py", CLIENT.read_bytes())
        fenced = [*target, "--proxy", "127.0.0.1:3128",
                  "--ca", "/etc/ssl/certs/ca-certificates.crt"]
        daemon_pid = int(DaemonClient(home).ping()["pid"])  # type: ignore[index]

        # memory first, while the daemon has served nothing else
        out["idle_1000_conn_mb"] = round(_idle(fenced, daemon_pid, sbx=sbx), 1)
        d_lat = _client(["latency", *direct])
        c_lat = _client(["latency", *fenced], sbx=sbx)
        out["direct_latency_p50_ms"] = round(d_lat["p50_ms"], 3)
        out["corral_latency_p50_ms"] = round(c_lat["p50_ms"], 3)
        out["added_latency_p50_ms"] = round(c_lat["p50_ms"] - d_lat["p50_ms"], 3)
        out["direct_rps_32"] = round(_client(["rps", *direct])["rps"])
        out["rps_32"] = round(_client(["rps", *fenced], sbx=sbx)["rps"])
        # the machine is shared and a download takes a fraction of a second: the two
        # are measured in turns, DOWNLOAD_RUNS times each, and the medians compared
        d_dl, c_dl = [], []
        for _ in range(DOWNLOAD_RUNS):
            d_dl.append(_client(["download", *direct])["mb_s"])
            c_dl.append(_client(["download", *fenced], sbx=sbx)["mb_s"])
        out["direct_download_mb_s"] = round(statistics.median(d_dl), 1)
        out["download_mb_s"] = round(statistics.median(c_dl), 1)
        out["download_runs"] = DOWNLOAD_RUNS
        out["download_vs_direct"] = round(statistics.median(c_dl) / statistics.median(d_dl), 3)
        out["daemon_rss_mb"] = round(_rss_mb(daemon_pid), 1)

        mitmdump = _mitmdump() if with_mitmproxy else None
        if with_mitmproxy and mitmdump is None:
            out["mitmproxy_error"] = "no Python >= 3.12 to install mitmproxy 12 with"
        if mitmdump is not None:
            mport = _free_port()
            conf = work / "mitm"
            conf.mkdir()
            mitm = subprocess.Popen(
                [mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(mport),
                 "--set", f"confdir={conf}", "--set", f"ssl_verify_upstream_trusted_ca={ca_file}",
                 "--set", "http2=false"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_port(mport)
            # mitmproxy resolves names itself: it is pointed at the upstream's address
            via = ["--host", "127.0.0.1", "--port", str(port), "--proxy", f"127.0.0.1:{mport}",
                   "--ca", str(conf / "mitmproxy-ca-cert.pem")]
            out["mitmproxy_version"] = subprocess.run(
                [mitmdump, "--version"], capture_output=True, text=True,
                check=False).stdout.split()[1]
            out["mitmproxy_idle_1000_conn_mb"] = round(_idle(via, mitm.pid), 1)
            m_lat = _client(["latency", *via])
            out["mitmproxy_latency_p50_ms"] = round(m_lat["p50_ms"], 3)
            out["mitmproxy_added_latency_p50_ms"] = round(m_lat["p50_ms"] - d_lat["p50_ms"], 3)
            out["mitmproxy_rps_32"] = round(_client(["rps", *via])["rps"])
            out["mitmproxy_download_mb_s"] = round(_client(["download", *via])["mb_s"], 1)
    finally:
        if mitm is not None:
            mitm.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                mitm.wait(10)
        if sbx is not None:
            with contextlib.suppress(Exception):
                sbx.destroy()
        with contextlib.suppress(Exception):
            from corral.security.daemon import DaemonClient

            DaemonClient(home).stop()
        upstream.terminate()
        upstream.wait(10)
        with contextlib.suppress(Exception):
            from corral.compute.local.storage import release

            release(home)
        shutil.rmtree(work, ignore_errors=True)
    _targets(out)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    return out


def _targets(out: dict[str, Any]) -> None:
    """The issue's targets, evaluated on this run's figures."""
    added, m_added = out.get("added_latency_p50_ms"), out.get("mitmproxy_added_latency_p50_ms")
    t: dict[str, bool | None] = {
        "added_latency_p50_le_2ms": added is not None and added <= 2.0,
        "added_latency_le_half_mitmproxy": (added <= 0.5 * m_added
                                            if added is not None and m_added else None),
        "rps_32_ge_2x_mitmproxy": (out["rps_32"] >= 2 * out["mitmproxy_rps_32"]
                                   if out.get("mitmproxy_rps_32") else None),
        "download_ge_half_direct": (out.get("download_mb_s", 0)
                                    >= 0.5 * out.get("direct_download_mb_s", 0)),
    }
    out["targets_met"] = t


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--upstream":
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        asyncio.run(_serve_upstream(sys.argv[2], sys.argv[3]))
        return
    if os.geteuid() != 0:
        print(json.dumps({"error": "bench/proxy.py needs root (it makes a real sandbox)"}))
        sys.exit(1)
    print(json.dumps(run(with_mitmproxy="--no-mitmproxy" not in sys.argv), indent=2))


if __name__ == "__main__":
    main()
