"""Load generator of bench/proxy.py: standard library only, so the same file runs
on the host and inside a sandbox (with the sandbox's own python3).

    python3 proxy_client.py MODE --host H --port P --ca FILE [--proxy 127.0.0.1:3128]

Modes (each prints one JSON object):
  latency   sequential GETs of /1k on one kept-alive connection -> p50/p90 in ms
  rps       32 connections, GETs of /1k for a fixed time -> requests per second
  download  one GET of /100m -> MB/s
  idle      open N connections (one GET each), hold them until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import ssl
import statistics
import sys
import time


def _ctx(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


def _connect(args: argparse.Namespace) -> ssl.SSLSocket:
    if args.proxy:
        ph, pp = args.proxy.rsplit(":", 1)
        s = socket.create_connection((ph, int(pp)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"CONNECT {args.host}:{args.port} HTTP/1.1\r\nHost: {args.host}:{args.port}"
                  "\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("proxy closed the connection")
            head += chunk
        if b" 200" not in head.split(b"\r\n")[0]:
            raise OSError(f"CONNECT failed: {head[:100]!r}")
    else:
        s = socket.create_connection((args.addr or args.host, args.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _ctx(args.ca).wrap_socket(s, server_hostname=args.host)


def _get(t: ssl.SSLSocket, host: str, path: str, buf: bytearray) -> int:
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = t.recv(65536)
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise OSError(f"status {status!r}: {head[:200]!r}")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    got = len(body)
    view = memoryview(buf)
    while got < n:
        r = t.recv_into(view, min(len(buf), n - got))
        if not r:
            raise OSError("connection closed in the body")
        got += r
    return n


def latency(args: argparse.Namespace) -> dict[str, float]:
    t = _connect(args)
    buf = bytearray(1 << 20)
    for _ in range(args.warmup):
        _get(t, args.authority, "/1k", buf)
    times = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        _get(t, args.authority, "/1k", buf)
        times.append(time.perf_counter() - t0)
    t.close()
    times.sort()
    return {"p50_ms": statistics.median(times) * 1000,
            "p90_ms": times[int(len(times) * 0.9)] * 1000, "n": len(times)}


def download(args: argparse.Namespace) -> dict[str, float]:
    t = _connect(args)
    buf = bytearray(4 << 20)
    _get(t, args.authority, "/1k", buf)
    t0 = time.perf_counter()
    n = _get(t, args.authority, "/100m", buf)
    dt = time.perf_counter() - t0
    t.close()
    return {"bytes": n, "seconds": dt, "mb_s": n / dt / 1e6}


async def _aconnect(args: argparse.Namespace) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    ctx = _ctx(args.ca)
    if args.proxy:
        ph, pp = args.proxy.rsplit(":", 1)
        r, w = await asyncio.open_connection(ph, int(pp))
        w.write(f"CONNECT {args.host}:{args.port} HTTP/1.1\r\nHost: {args.host}:{args.port}"
                "\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n")[0]:
            raise OSError(f"CONNECT failed: {head[:100]!r}")
        await w.start_tls(ctx, server_hostname=args.host)
        return r, w
    return await asyncio.open_connection(args.addr or args.host, args.port, ssl=ctx,
                                         server_hostname=args.host)


async def _aget(r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str,
                path: str) -> None:
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    if n:
        await r.readexactly(n)


async def _rps(args: argparse.Namespace) -> dict[str, float]:
    conns = [await _aconnect(args) for _ in range(args.concurrency)]
    for r, w in conns:
        await _aget(r, w, args.authority, "/1k")
    count = 0
    stop = time.perf_counter() + args.seconds

    async def worker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await _aget(r, w, args.authority, "/1k")
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    dt = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    return {"rps": count / dt, "requests": count, "seconds": dt}


async def _idle(args: argparse.Namespace) -> dict[str, float]:
    conns = []
    sem = asyncio.Semaphore(50)

    async def one() -> None:
        async with sem:
            r, w = await _aconnect(args)
            await _aget(r, w, args.authority, "/1k")
            conns.append((r, w))

    await asyncio.gather(*(one() for _ in range(args.n)))
    print(json.dumps({"open": len(conns)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.close()
    return {"closed": len(conns)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["latency", "rps", "download", "idle"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--addr", default=None, help="connect here instead of --host (direct)")
    p.add_argument("--ca", required=True)
    p.add_argument("--proxy", default=None)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if args.port != 443:  # the Host header names a non-default port
        args.authority = f"{args.host}:{args.port}"
    else:
        args.authority = args.host
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "latency":
        out = latency(args)
    elif args.mode == "download":
        out = download(args)
    elif args.mode == "rps":
        out = asyncio.run(_rps(args))
    else:
        out = asyncio.run(_idle(args))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
