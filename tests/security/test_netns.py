"""Sockets made inside network namespaces: each lands in the namespace it was made for,
also when many are made at once from many threads, and a mismatch is an error.

The namespaces are the test's own (``unshare --net=FILE``), loopback only."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.security import netns


@pytest.fixture
def namespaces(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []
    try:
        for name in ("ns-a", "ns-b", "ns-c"):
            path = tmp_path / name
            path.touch()
            subprocess.run(["unshare", f"--net={path}", "ip", "link", "set", "lo", "up"],
                           check=True)
            made.append(path)
        yield made
    finally:
        for path in made:
            subprocess.run(["umount", str(path)], check=False)


def test_sockets_live_in_the_namespace_they_were_made_for(namespaces):
    a, b, _ = namespaces
    here = netns.netns_id("/proc/thread-self/ns/net")
    assert len({netns.netns_id(a), netns.netns_id(b), here}) == 3
    socks = netns.make_sockets(a, [netns.Listen("tcp", 3128), netns.Listen("udp", 53, "udp")],
                               expect=netns.netns_id(a))
    try:
        assert {netns.socket_netns(s) for s in socks.values()} == {netns.netns_id(a)}
        assert socks["udp"].type == socket.SOCK_DGRAM
        # the same ports are free in another namespace, and the caller never moved
        other = netns.make_sockets(b, [netns.Listen("tcp", 3128), netns.Listen("u", 53, "udp")])
        assert {netns.socket_netns(s) for s in other.values()} == {netns.netns_id(b)}
        for s in other.values():
            s.close()
        assert netns.netns_id("/proc/thread-self/ns/net") == here
    finally:
        for s in socks.values():
            s.close()


def test_many_threads_making_sockets_in_many_namespaces_at_once(namespaces):
    """What concurrent attaches do: no thread's namespace leaks into another's sockets."""
    go = threading.Barrier(24)
    results: list[tuple[Path, netns.NetnsId, str]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        ns = namespaces[i % 3]
        go.wait()
        try:
            socks = netns.make_sockets(ns, [netns.Listen("t", 4000 + i),
                                            netns.Listen("u", 4000 + i, "udp")])
        except BaseException as exc:
            errors.append(exc)
            return
        for name, s in socks.items():
            results.append((ns, netns.socket_netns(s), name))
            s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 48
    assert all(got == netns.netns_id(ns) for ns, got, _ in results)


def test_a_replaced_namespace_is_refused_and_nothing_stays_bound(namespaces):
    a, b, _ = namespaces
    with pytest.raises(SandboxError, match="not the net:"):
        netns.make_sockets(a, [netns.Listen("udp", 53, "udp")], expect=netns.netns_id(b))
    with pytest.raises(SandboxError, match="not the net:"):
        netns.apply_rules(a, expect=netns.netns_id(b))
    # all or nothing: the first socket is closed when the second cannot be bound
    held = netns.udp_socket(a, 53)
    try:
        with pytest.raises(SandboxError, match=r"cannot bind UDP 127\.0\.0\.1:53 .* in use"):
            netns.make_sockets(a, [netns.Listen("tcp", 3128), netns.Listen("udp", 53, "udp")])
        netns.listen_tcp(a, 3128).close()
    finally:
        held.close()
    netns.udp_socket(a, 53).close()


def test_a_file_that_is_no_namespace_is_a_clear_error(tmp_path):
    plain = tmp_path / "not-a-netns"
    plain.touch()
    with pytest.raises(SandboxError, match="cannot enter the sandbox's network namespace"):
        netns.listen_tcp(plain, 3128)
    with pytest.raises(SandboxError, match="cannot enter"):
        netns.make_sockets(tmp_path / "missing", [netns.Listen("t", 3128)])
