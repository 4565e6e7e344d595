"""The environment base: the host's own root filesystem, read-only, with its
secrets masked out; or an imported root filesystem image.

The host root is the lowest overlay layer. Above it sits a small *mask* layer
that overlayfs itself applies: opaque directories and whiteouts hide whatever
is not part of a dev toolchain (home directories, /root, /tmp, /run, /srv,
/mnt, other projects, corral's own state, container engines' state, host logs
and SSH host keys), and generated ``/etc/passwd`` / ``/etc/group`` add the
sandbox's ``agent`` account. Nothing is hidden by bind mounts that a process
could unmount: the hidden files are simply not in the sandbox's tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from corral.compute.types import AGENT_HOME, AGENT_USER, WORKSPACE

#: bump when the mask's rules change, so cached masks are rebuilt
MASK_VERSION = "3"

#: top-level host directories a sandbox sees (read-only, through the overlay)
ALLOWED_TOP = frozenset({"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt",
                         "var"})

#: top-level directories a sandbox gets empty (mount points and scratch), with modes
EMPTY_TOP = {"tmp": 0o1777, "proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755,
             "root": 0o700, "home": 0o755, "mnt": 0o755, "media": 0o755, "srv": 0o755}

#: deeper paths hidden inside allowed trees (relative to /)
HIDDEN = (
    "var/lib/corral", "var/lib/docker", "var/lib/containers", "var/lib/containerd",
    "var/lib/postgresql", "var/lib/mysql", "var/lib/redis", "var/lib/lxc", "var/lib/lxd",
    "var/lib/incus", "var/lib/libvirt", "var/lib/kubelet", "var/lib/rancher",
    "var/log", "var/mail", "var/spool", "var/backups", "var/cache/corral",
    "etc/ssh", "etc/sudoers.d", "etc/corral",
)
#: hidden but recreated empty, with this mode
HIDDEN_EMPTY = {"var/tmp": 0o1777, "var/log": 0o755}

_OPAQUE = "trusted.overlay.opaque"


def host_mask_key(state_home: Path, uid: int) -> str:
    """A key that changes when the mask must be rebuilt."""
    h = hashlib.sha256()
    h.update(MASK_VERSION.encode())
    h.update(str(state_home).encode())
    h.update(str(uid).encode())
    for name in sorted(os.listdir("/")):
        try:
            st = os.lstat(f"/{name}")
        except OSError:
            continue
        h.update(f"{name}:{stat.S_IFMT(st.st_mode)}\n".encode())
    for f in ("/etc/passwd", "/etc/group"):
        try:
            h.update(Path(f).read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


def build_host_mask(dest: Path, state_home: Path, uid: int) -> None:
    """Write the mask layer into ``dest`` (a fresh directory), atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=0o755)
    for name in sorted(os.listdir("/")):
        if name in ALLOWED_TOP:
            continue
        path = Path("/") / name
        target = tmp / name
        if name in EMPTY_TOP or (path.is_dir() and not path.is_symlink()):
            _opaque_dir(target, EMPTY_TOP.get(name, 0o755))
        else:
            _whiteout(target)
    for name, mode in EMPTY_TOP.items():
        if not (tmp / name).exists():
            _opaque_dir(tmp / name, mode)
    hidden = list(HIDDEN)
    home = state_home.resolve()
    rel_home = home.relative_to("/")
    if rel_home.parts and rel_home.parts[0] in ALLOWED_TOP:
        hidden.append(str(rel_home))
    for rel in hidden:
        host = Path("/") / rel
        if not host.exists() and not host.is_symlink():
            continue
        _mirror_parents(tmp, rel)
        target = tmp / rel
        if rel in HIDDEN_EMPTY or (host.is_dir() and not host.is_symlink()):
            _opaque_dir(target, HIDDEN_EMPTY.get(rel, 0o755))
        else:
            _whiteout(target)
    for rel, mode in HIDDEN_EMPTY.items():
        if not (tmp / rel).exists():
            _mirror_parents(tmp, rel)
            _opaque_dir(tmp / rel, mode)
    # the sandbox's own account, home and workspace
    _mirror_parents(tmp, "etc/passwd")
    (tmp / "etc" / "passwd").write_text(_passwd(uid))
    (tmp / "etc" / "group").write_text(_group(uid))
    for f in ("passwd", "group"):
        (tmp / "etc" / f).chmod(0o644)
    (tmp / "etc" / "hostname").write_text("corral\n")
    (tmp / "etc" / "hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tcorral\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    agent_home = tmp / AGENT_HOME.lstrip("/")
    agent_home.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(agent_home, uid, uid)
    ws = tmp / WORKSPACE.lstrip("/")
    if ws.exists():
        os.rmdir(ws)
    _opaque_dir(ws, 0o755)
    os.chown(ws, uid, uid)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _opaque_dir(path: Path, mode: int) -> None:
    path.mkdir(exist_ok=True)
    path.chmod(mode)
    os.setxattr(path, _OPAQUE, b"y")


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _mirror_parents(tmp: Path, rel: str) -> None:
    """Create the parents of ``rel`` in the mask with the host's modes and owners
    (the upper-most layer's directory attributes are the ones the sandbox sees)."""
    parts = Path(rel).parts[:-1]
    cur_host = Path("/")
    cur = tmp
    for p in parts:
        cur_host = cur_host / p
        cur = cur / p
        if not cur.exists():
            st = cur_host.stat()
            cur.mkdir()
            cur.chmod(stat.S_IMODE(st.st_mode))
            os.chown(cur, st.st_uid, st.st_gid)


def _passwd(uid: int) -> str:
    try:
        host = Path("/etc/passwd").read_text()
    except OSError:
        host = "root:x:0:0:root:/root:/bin/sh\n"
    lines = [ln for ln in host.splitlines() if ln and ln.split(":")[0] != AGENT_USER
             and not (len(ln.split(":")) > 2 and ln.split(":")[2] == str(uid))]
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    lines.append(f"{AGENT_USER}:x:{uid}:{uid}:corral agent:{AGENT_HOME}:{shell}")
    return "\n".join(lines) + "\n"


def _group(uid: int) -> str:
    try:
        host = Path("/etc/group").read_text()
    except OSError:
        host = "root:x:0:\n"
    lines = [ln for ln in host.splitlines() if ln and ln.split(":")[0] != AGENT_USER
             and not (len(ln.split(":")) > 2 and ln.split(":")[2] == str(uid))]
    lines.append(f"{AGENT_USER}:x:{uid}:")
    return "\n".join(lines) + "\n"


def build_image_mask(dest: Path, image: Path, uid: int) -> None:
    """The layer above an imported image: the agent account, its home, /workspace."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "etc").mkdir(parents=True, mode=0o755)
    for name, fn in (("passwd", _image_passwd), ("group", _image_group)):
        (tmp / "etc" / name).write_text(fn(image, uid))
        (tmp / "etc" / name).chmod(0o644)
    agent_home = tmp / AGENT_HOME.lstrip("/")
    agent_home.mkdir(parents=True, mode=0o755)
    os.chown(agent_home, uid, uid)
    ws = tmp / WORKSPACE.lstrip("/")
    ws.mkdir(mode=0o755)
    os.chown(ws, uid, uid)
    for name, mode in (("tmp", 0o1777), ("proc", 0o555), ("dev", 0o755), ("run", 0o755)):
        if not (image / name).is_dir():
            (tmp / name).mkdir(mode=mode)
            (tmp / name).chmod(mode)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _image_passwd(image: Path, uid: int) -> str:
    f = image / "etc" / "passwd"
    fallback = "root:x:0:0:root:/root:/bin/sh\n"
    text = f.read_text() if f.is_file() and not f.is_symlink() else fallback
    lines = [ln for ln in text.splitlines() if ln and ln.split(":")[0] != AGENT_USER]
    lines.append(f"{AGENT_USER}:x:{uid}:{uid}:corral agent:{AGENT_HOME}:/bin/sh")
    return "\n".join(lines) + "\n"


def _image_group(image: Path, uid: int) -> str:
    f = image / "etc" / "group"
    text = f.read_text() if f.is_file() and not f.is_symlink() else "root:x:0:\n"
    lines = [ln for ln in text.splitlines() if ln and ln.split(":")[0] != AGENT_USER]
    lines.append(f"{AGENT_USER}:x:{uid}:")
    return "\n".join(lines) + "\n"
