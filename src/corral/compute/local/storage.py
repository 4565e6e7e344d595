"""Layer storage: where sandboxes' writable layers and sealed snapshots live.

Two backends with the same semantics:

- ``btrfs`` (preferred): every writable layer is a subvolume; sealing one is a
  read-only subvolume snapshot (a few ms, whatever the size); restore and fork
  are writable snapshots of the sealed one. If corral's state dir is not on
  btrfs, a sparse pool file is formatted and loop-mounted (as LXD and Incus do).
- ``copy`` (portable fallback): sealing copies the writable layer (cost grows
  with what changed, never with the size of the tree); restore and fork stack a
  new empty writable layer on the sealed one.

Subvolumes are made with the btrfs ioctls directly: a fork and exec of
``btrfs`` per operation would dominate snapshot and fork times. They go through
libc's ``ioctl`` by ctypes, not ``fcntl.ioctl``: CPython holds the GIL through
an ``fcntl.ioctl`` whose argument is larger than 1 KiB (the btrfs ones are
4 KiB), and a snapshot commits a btrfs transaction, so every other thread of
the process (an orchestrator's dozens) would stop for those milliseconds.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

from corral._units import parse_size
from corral.errors import MissingTool, OutOfSpace, StorageError
from corral.settings import Settings

# <linux/btrfs.h>: _IOW(0x94, nr, 4096-byte argument structs)
_IOC_SUBVOL_CREATE = 0x5000940E
_IOC_SNAP_DESTROY = 0x5000940F
_IOC_SNAP_CREATE_V2 = 0x50009417
_SUBVOL_RDONLY = 1 << 1
_BTRFS_SUPER_MAGIC = 0x9123683E


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, req: int, arg: bytearray) -> None:
    """``ioctl(fd, req, arg)`` with the GIL released (see the module docstring)."""
    buf = (ctypes.c_char * len(arg)).from_buffer(arg)
    if _libc.ioctl(fd, req, ctypes.addressof(buf)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _vol_args(name: str) -> bytearray:
    return bytearray(struct.pack("=q4088s", 0, name.encode()))


def _vol_args_v2(src_fd: int, name: str, flags: int) -> bytearray:
    return bytearray(struct.pack("=qQQ32s4040s", src_fd, 0, flags, b"", name.encode()))


def _os_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"out of space while {what}; free space or grow the pool")
    return StorageError(f"{what} failed: {exc.strerror or exc}")


def is_btrfs(path: Path) -> bool:
    """Whether ``path`` is on a btrfs filesystem (statfs magic)."""
    out = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True,
                         check=False)
    return out.returncode == 0 and out.stdout.strip() == format(_BTRFS_SUPER_MAGIC, "x")


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split(" ")[4] == target:
            return True
    return False


class LayerStore(abc.ABC):
    """Writable layers of sandboxes and the sealed layers of snapshots."""

    kind: str

    def __init__(self, root: Path) -> None:
        self.root = root

    def sandbox_dir(self, sid: str) -> Path:
        return self.root / "sandboxes" / sid

    def upper(self, sid: str) -> Path:
        return self.sandbox_dir(sid) / "upper"

    def work(self, sid: str) -> Path:
        return self.sandbox_dir(sid) / "work"

    def path(self, layer: str) -> Path:
        """Host path of a layer named in a lowers list (``/`` is the host root)."""
        return Path(layer) if layer.startswith("/") else self.root / layer

    @abc.abstractmethod
    def new_sandbox(self, sid: str, snapshot_layer: str | None, snapshot_lowers: list[str]
                    ) -> list[str]:
        """Make the sandbox's writable layer, empty or from a sealed one. Returns the
        layers that go *above* the base lowers (top first) and replaces them all
        when starting from a snapshot: the full lowers list in that case."""

    @abc.abstractmethod
    def seal(self, sid: str, snap_id: str) -> tuple[str, int]:
        """Seal the sandbox's writable layer as ``snap_id``; returns (layer, size)."""

    @abc.abstractmethod
    def drop_sandbox(self, sid: str) -> None:
        """Delete the sandbox's writable layer (idempotent)."""

    @abc.abstractmethod
    def drop_layer(self, layer: str) -> None:
        """Delete a sealed layer (idempotent)."""

    def reset_work(self, sid: str) -> None:
        work = self.work(sid)
        if work.exists():
            _rmtree(work)
        work.mkdir(mode=0o700)

    def describe(self) -> str:
        return f"{self.kind} at {self.root}"


def _rmtree(path: Path) -> None:
    # overlay leaves work/work with mode 000; root can still remove it
    shutil.rmtree(path, ignore_errors=False)


class BtrfsStore(LayerStore):
    kind = "btrfs"

    def __init__(self, root: Path, pool: Path | None = None) -> None:
        super().__init__(root)
        self.pool = pool
        for d in ("sandboxes", "layers", "base", "images"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        where = f"loop-mounted pool {self.pool}" if self.pool else "the state dir's own btrfs"
        return f"btrfs subvolumes on {where} (mounted at {self.root})"

    def _ioctl_in(self, parent: Path, req: int, arg: bytearray, what: str) -> None:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _ioctl(fd, req, arg)
        except OSError as exc:
            raise _os_error(exc, what) from exc
        finally:
            os.close(fd)

    def _subvol_create(self, path: Path) -> None:
        self._ioctl_in(path.parent, _IOC_SUBVOL_CREATE, _vol_args(path.name),
                       f"creating subvolume {path.name}")

    def _snapshot(self, src: Path, dst: Path, *, readonly: bool) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._ioctl_in(dst.parent, _IOC_SNAP_CREATE_V2,
                           _vol_args_v2(sfd, dst.name, _SUBVOL_RDONLY if readonly else 0),
                           f"snapshotting {src.name}")
        finally:
            os.close(sfd)

    def _subvol_delete(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            self._ioctl_in(path.parent, _IOC_SNAP_DESTROY, _vol_args(path.name),
                           f"deleting subvolume {path.name}")
        except StorageError:
            # not a subvolume (a plain directory left by an interrupted create)
            _rmtree(path)

    def new_sandbox(self, sid: str, snapshot_layer: str | None, snapshot_lowers: list[str]
                    ) -> list[str]:
        d = self.sandbox_dir(sid)
        if snapshot_layer is None:
            self._subvol_create(d)
            self.upper(sid).mkdir(mode=0o755)
            self.work(sid).mkdir(mode=0o700)
            return []
        self._snapshot(self.path(snapshot_layer), d, readonly=False)
        self.reset_work(sid)
        return list(snapshot_lowers)

    def seal(self, sid: str, snap_id: str) -> tuple[str, int]:
        layer = f"layers/{snap_id}"
        self._snapshot(self.sandbox_dir(sid), self.root / layer, readonly=True)
        return layer, 0

    def drop_sandbox(self, sid: str) -> None:
        self._subvol_delete(self.sandbox_dir(sid))

    def drop_layer(self, layer: str) -> None:
        self._subvol_delete(self.path(layer))


class CopyStore(LayerStore):
    kind = "copy"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        for d in ("sandboxes", "layers", "base", "images"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"copy fallback (plain directories at {self.root}; install btrfs-progs for " \
               "millisecond snapshots)"

    def new_sandbox(self, sid: str, snapshot_layer: str | None, snapshot_lowers: list[str]
                    ) -> list[str]:
        d = self.sandbox_dir(sid)
        d.mkdir(mode=0o700)
        self.upper(sid).mkdir(mode=0o755)
        self.work(sid).mkdir(mode=0o700)
        if snapshot_layer is None:
            return []
        return [f"{snapshot_layer}/upper", *snapshot_lowers]

    def seal(self, sid: str, snap_id: str) -> tuple[str, int]:
        layer = f"layers/{snap_id}"
        dst = self.root / layer
        dst.mkdir(mode=0o700)
        r = subprocess.run(
            ["cp", "-a", "--reflink=auto", str(self.upper(sid)), str(dst / "upper")],
            capture_output=True, text=True, check=False)
        if r.returncode != 0:
            _rmtree(dst)
            if "No space" in r.stderr:
                raise OutOfSpace(f"out of space while snapshotting {sid}")
            raise StorageError(f"copying the writable layer failed: {r.stderr.strip()}")
        du = subprocess.run(["du", "-sb", str(dst)], capture_output=True, text=True, check=False)
        size = int(du.stdout.split()[0]) if du.returncode == 0 and du.stdout else 0
        return layer, size

    def drop_sandbox(self, sid: str) -> None:
        d = self.sandbox_dir(sid)
        if d.exists():
            _rmtree(d)

    def drop_layer(self, layer: str) -> None:
        p = self.path(layer)
        if p.exists():
            _rmtree(p)


def open_layer_store(settings: Settings) -> LayerStore:
    """The installation's layer store, set up on first use and remembered.

    The backend chosen the first time is recorded in ``storage.json`` so that
    later processes never switch backends under existing sandboxes.
    """
    home = settings.home
    root = home / "storage"
    record = home / "storage.json"
    lock = home / "storage.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if record.exists():
            info = json.loads(record.read_text())
        else:
            info = {"kind": _choose(settings, root)}
        kind = info["kind"]
        if kind == "btrfs-loop":
            image = home / "storage.img"
            if not image.exists() and not record.exists():
                _make_pool(image, settings.storage_size)
            if not is_mountpoint(root):
                root.mkdir(exist_ok=True, mode=0o700)
                _mount_pool(image, root)
            store: LayerStore = BtrfsStore(root, pool=image)
        elif kind == "btrfs":
            root.mkdir(exist_ok=True, mode=0o700)
            store = BtrfsStore(root)
        else:
            root.mkdir(exist_ok=True, mode=0o700)
            store = CopyStore(root)
        if not record.exists():
            record.write_text(json.dumps(info))
        return store
    finally:
        os.close(fd)


def _choose(settings: Settings, root: Path) -> str:
    want = settings.storage
    if want == "copy":
        return "copy"
    home = settings.home
    if is_btrfs(home):
        return "btrfs"
    if shutil.which("mkfs.btrfs") is None:
        if want == "btrfs":
            raise MissingTool("btrfs storage needs mkfs.btrfs: apt-get install btrfs-progs")
        return "copy"
    if os.geteuid() != 0:
        if want == "btrfs":
            raise MissingTool("a loop-mounted btrfs pool needs root")
        return "copy"
    return "btrfs-loop"


def _make_pool(image: Path, size: str) -> None:
    try:
        nbytes = parse_size(size)
    except ValueError as exc:
        raise StorageError(f"CORRAL_STORAGE_SIZE: {exc}") from None
    with image.open("wb") as f:
        f.truncate(nbytes)
    image.chmod(0o600)
    r = subprocess.run(["mkfs.btrfs", "-q", "-f", "-m", "single", str(image)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        image.unlink()
        raise StorageError(f"mkfs.btrfs failed: {r.stderr.strip()}")


def _mount_pool(image: Path, root: Path) -> None:
    r = subprocess.run(
        ["mount", "-o", "loop,discard,noatime", "-t", "btrfs", str(image), str(root)],
        capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise StorageError(f"mounting the btrfs pool {image} failed: {r.stderr.strip()}")


def release(home: Path) -> None:
    """Unmount the loop-mounted pool of ``home`` (its loop device goes with it)."""
    root = home / "storage"
    if is_mountpoint(root):
        r = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            with contextlib.suppress(Exception):
                subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
