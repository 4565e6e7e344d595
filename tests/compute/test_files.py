"""sbx.files from the host: never led out of the sandbox's tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral import NotFound, Sandbox, UsageError
from corral.compute.files import RootedPath


def test_roundtrip_and_ownership(sandbox: Sandbox) -> None:
    sandbox.files.write("/workspace/a/b/c.txt", "hello")
    assert sandbox.files.read("/workspace/a/b/c.txt") == b"hello"
    assert sandbox.files.read("a/b/c.txt") == b"hello"  # relative to /workspace
    # the sandbox user owns what the host wrote for it, and can change it
    r = sandbox.commands.run("stat -c %U a/b/c.txt a/b; echo more >> a/b/c.txt")
    assert r.stdout.split() == ["agent", "agent"] and r.exit_code == 0
    entries = {e.name: e.type for e in sandbox.files.list("/workspace/a/b")}
    assert entries == {"c.txt": "file"}
    sandbox.files.remove("/workspace/a", recursive=True)
    assert not sandbox.files.exists("/workspace/a")


def test_errors_are_clear(sandbox: Sandbox) -> None:
    with pytest.raises(NotFound, match="/workspace/missing"):
        sandbox.files.read("/workspace/missing")
    with pytest.raises(UsageError, match="is a directory"):
        sandbox.files.read("/workspace")
    sandbox.files.write("/workspace/d/x", b"1")
    with pytest.raises(UsageError, match="not empty"):
        sandbox.files.remove("/workspace/d")


def test_symlinks_resolve_inside_the_sandbox(sandbox: Sandbox) -> None:
    host_secret = Path("/etc/hostname").read_bytes()
    sandbox.commands.run(
        "ln -s /etc/hostname /workspace/abs; ln -s ../../../../../etc/hostname /workspace/rel;"
        "ln -s / /workspace/root; ln -s /proc/1/root /workspace/procroot")
    # the sandbox's /etc/hostname ("corral"), never the host's
    for link in ("/workspace/abs", "/workspace/rel", "/workspace/root/etc/hostname"):
        assert sandbox.files.read(link) == b"corral\n"
    assert host_secret != b"corral\n"
    # writes through a symlink land inside the sandbox too
    sandbox.commands.run("ln -s /tmp/target /workspace/wlink")
    sandbox.files.write("/workspace/wlink", b"via link")
    assert sandbox.files.read("/tmp/target") == b"via link"
    assert not Path("/tmp/target").exists() or Path("/tmp/target").read_bytes() != b"via link"


def test_download_keeps_symlinks_as_links(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.commands.run("mkdir -p out; echo data > out/f; ln -s /etc/shadow out/evil")
    n = sandbox.files.download("/workspace/out", tmp_path / "out")
    assert n == 2
    assert (tmp_path / "out" / "f").read_text() == "data\n"
    assert os.readlink(tmp_path / "out" / "evil") == "/etc/shadow"


def test_upload_tree(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x.py").write_text("print(1)")
    (tmp_path / "src" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tmp_path / "src" / "run.sh").chmod(0o755)
    assert sandbox.files.upload(tmp_path / "src", "/workspace/dst") == 2
    assert sandbox.commands.run("./dst/run.sh").stdout == "ran\n"


def test_files_work_when_stopped(sandbox: Sandbox) -> None:
    sandbox.files.write("/workspace/k", b"1")
    sandbox.stop()
    assert sandbox.files.read("/workspace/k") == b"1"
    sandbox.files.write("/workspace/k", b"2")
    sandbox.resume()
    assert sandbox.commands.run("cat k").stdout == "2"


# -- the resolver itself, on a plain directory tree, against adversarial paths ----------
_parts = st.sampled_from(["..", ".", "a", "b", "link", "abs", "loop", "", "c"])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(_parts, max_size=8).map(lambda p: "/" + "/".join(p)))
def test_resolution_never_leaves_the_root(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    if not root.exists():
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "link").symlink_to("../../../..")
        (root / "a" / "abs").symlink_to("/a/b")
        (root / "loop").symlink_to("loop")
        (tmp_path / "outside").write_text("x")
    rp = RootedPath(root)
    real_root = os.path.realpath(root)
    try:
        with rp.parent(path) as (dfd, _name):
            where = os.readlink(f"/proc/self/fd/{dfd}")
    except OSError:
        return  # ELOOP / ENOENT / ENOTDIR are fine answers
    assert where == real_root or where.startswith(real_root + "/")
