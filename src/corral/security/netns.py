"""Sockets and firewall rules inside a sandbox's network namespace.

The proxy lives on the host, yet its listening sockets live in the sandbox's
namespace: a short-lived thread enters the namespace (``setns`` changes only
the calling thread), creates the socket and ends. The socket keeps the
namespace it was made in, so the host process serves 127.0.0.1:3128 *inside*
the sandbox with no veth, no route and no relay process. Nothing in the
sandbox can take those ports while the proxy holds them, and the sandbox has
no capability to touch the rules below.

A socket in the wrong namespace would be a silent failure (one sandbox without
its DNS stub, another refused its own port), so nothing is taken on trust: the
thread checks where it is after ``setns``, and every socket is checked to live
in the namespace it was made for (``SIOCGSKNS``: the kernel's own answer).

Transparent mode adds, inside the namespace only, a default route over
loopback (so a connect to any address gets as far as the firewall instead of
failing with "network unreachable") and nftables rules that redirect every
TCP connect to a non-loopback address to the proxy's transparent port, and
drop every other packet bound for a non-loopback address (UDP, ICMP, raw).
IPv6 gets no route at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from corral.errors import SandboxError

__all__ = ["PROXY_PORT", "TRANSPARENT_PORT", "Listen", "NetnsId", "apply_rules", "in_netns",
           "listen_tcp", "make_sockets", "netns_id", "rules_text", "socket_netns",
           "udp_socket"]

T = TypeVar("T")

#: the explicit proxy, for tools that honour HTTP(S)_PROXY
PROXY_PORT = 3128
#: where transparent mode redirects every other TCP connect
TRANSPARENT_PORT = 3129
#: nftables table corral owns inside a sandbox namespace
TABLE = "corral"

_CLONE_NEWNET = 0x40000000
#: <linux/sockios.h>: a new fd for the network namespace a socket belongs to
_SIOCGSKNS = 0x894C
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class NetnsId:
    """A network namespace's identity: the (device, inode) of its nsfs file."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"net:[{self.ino}]"


def netns_id(netns: str | Path) -> NetnsId:
    """The namespace a bound namespace file (or ``/proc/PID/ns/net``) stands for."""
    st = os.stat(netns)
    return NetnsId(st.st_dev, st.st_ino)


def socket_netns(sock: socket.socket | int) -> NetnsId:
    """The namespace a socket lives in (``SIOCGSKNS``), whichever thread asks."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    ns = fcntl.ioctl(fd, _SIOCGSKNS)
    try:
        st = os.fstat(ns)
    finally:
        os.close(ns)
    return NetnsId(st.st_dev, st.st_ino)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(netns: str | Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered the network namespace ``netns``.

    Blocks until it returns; re-raises its exception. Sockets made by ``fn`` keep
    that namespace for their whole life. The thread is never reused (``setns``
    changes the calling thread only, and that thread ends with ``fn``), and it
    checks that it really is in ``netns`` before calling ``fn``."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                _setns(fd)
            finally:
                os.close(fd)
            here = os.stat("/proc/thread-self/ns/net")
            if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                raise SandboxError(f"entering the network namespace {netns} failed: "
                                   f"the thread is in net:[{here.st_ino}], not "
                                   f"net:[{st.st_ino}]")
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, name="corral-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        err = box["error"]
        assert isinstance(err, BaseException)
        raise err
    return box["value"]  # type: ignore[return-value]


@dataclass(frozen=True)
class Listen:
    """One socket to make in a sandbox namespace."""

    name: str
    port: int
    kind: str = "tcp"  # tcp (listening) | udp (bound)
    host: str = "127.0.0.1"
    backlog: int = 1024

    def describe(self) -> str:
        return f"{'listen on' if self.kind == 'tcp' else 'bind UDP'} {self.host}:{self.port}"


def _make(spec: Listen) -> socket.socket:
    if spec.kind == "tcp":
        # proto given explicitly: accepted sockets inherit it, and asyncio turns Nagle's
        # algorithm off only on sockets whose proto says TCP (40 ms stalls otherwise)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if spec.kind == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((spec.host, spec.port))
        if spec.kind == "tcp":
            s.listen(spec.backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def make_sockets(netns: str | Path, specs: Sequence[Listen],
                 expect: NetnsId | None = None) -> dict[str, socket.socket]:
    """Make every socket of ``specs`` inside ``netns``, in one short-lived thread.

    Each socket is checked to live in that namespace (``SIOCGSKNS``) — and in
    ``expect``, when given: the namespace the caller identified earlier, so a
    namespace file replaced meanwhile is noticed. All or nothing: on any failure
    the sockets made so far are closed. Raises ``SandboxError`` naming the socket."""
    ns = str(netns)

    def make_all() -> dict[str, socket.socket]:
        target = netns_id("/proc/thread-self/ns/net")
        if expect is not None and target != expect:
            raise SandboxError(f"the network namespace {ns} is {target}, not the {expect} "
                               "it was when the sandbox was attached")
        made: dict[str, socket.socket] = {}
        try:
            for spec in specs:
                try:
                    s = _make(spec)
                except OSError as exc:
                    raise SandboxError(f"cannot {spec.describe()} in the sandbox's network "
                                       f"namespace {ns}: {exc.strerror or exc}") from None
                made[spec.name] = s
                got = socket_netns(s)
                if got != target:
                    raise SandboxError(f"the {spec.name} socket ({spec.describe()}) was made "
                                       f"in {got}, not in the sandbox's namespace {target}")
        except BaseException:
            for s in made.values():
                s.close()
            raise
        return made

    try:
        return in_netns(ns, make_all)
    except OSError as exc:
        raise SandboxError(f"cannot enter the sandbox's network namespace {ns}: "
                           f"{exc.strerror or exc}") from None


def listen_tcp(netns: str | Path, port: int, host: str = "127.0.0.1",
               backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` inside ``netns``."""
    return make_sockets(netns, [Listen("tcp", port, "tcp", host, backlog)])["tcp"]


def udp_socket(netns: str | Path, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` inside ``netns``."""
    return make_sockets(netns, [Listen("udp", port, "udp", host)])["udp"]


def rules_text(transparent_port: int = TRANSPARENT_PORT) -> str:
    """The nftables ruleset corral puts in a sandbox namespace (idempotent to apply)."""
    return f"""\
table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain divert {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :{transparent_port}
  }}
  chain guard {{
    type filter hook output priority 0; policy accept;
    ip daddr 127.0.0.0/8 accept
    meta l4proto tcp accept
    counter drop
  }}
}}
table ip6 {TABLE}
delete table ip6 {TABLE}
table ip6 {TABLE} {{
  chain guard {{
    type filter hook output priority 0; policy accept;
    ip6 daddr ::1 accept
    counter drop
  }}
}}
"""


def apply_rules(netns: str | Path, transparent_port: int = TRANSPARENT_PORT,
                expect: NetnsId | None = None) -> None:
    """Install the loopback default route and the nftables rules in ``netns``
    (checked to be ``expect`` when given).

    Idempotent: applying twice leaves one copy. Raises ``SandboxError``."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if expect is not None and NetnsId(st.st_dev, st.st_ino) != expect:
            raise SandboxError(f"the network namespace {netns} is net:[{st.st_ino}], not "
                               f"the {expect} it was when the sandbox was attached")
        script = ("ip route replace default dev lo src 127.0.0.1 && "
                  "nft -f /dev/stdin")
        # nsenter enters the namespace this fd holds: the one just checked
        r = subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", "sh", "-c", script],
                           input=rules_text(transparent_port), capture_output=True,
                           text=True, check=False, pass_fds=(fd,))
    finally:
        os.close(fd)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln] or lines
        raise SandboxError("cannot install the fence's firewall rules in the sandbox "
                           f"namespace: {errors[0] if errors else f'exit {r.returncode}'}")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a redirected connection was headed to (``SO_ORIGINAL_DST``)."""
    raw = sock.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntoa(raw[4:8]), port
