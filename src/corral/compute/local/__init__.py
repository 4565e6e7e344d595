"""The ``local`` provider: Linux namespaces on this machine (the embedded default).

One sandbox is:

- a writable layer in the layer store (btrfs subvolume, or a plain directory);
- an overlay mounted at ``$CORRAL_HOME/sandboxes/<id>/rootfs``: that layer over
  read-only lowers (sealed snapshot layers, the host mask, the host root);
- a persistent network namespace bound at ``.../netns`` (loopback only; it
  outlives stop/resume so the security layer can attach to it once);
- a cgroup per hierarchy (limits, freezer, kill);
- an init: ``bwrap`` with new pid/mount/ipc/uts/cgroup namespaces, the overlay
  as ``/``, its own /proc and /dev, all capabilities dropped, running
  ``sleep infinity`` (bwrap's own pid 1 reaps orphans).

Commands enter the init's namespaces with ``nsenter`` and drop to the sandbox
user with ``setpriv`` (no capabilities, no_new_privs); ``root`` inside means a
user namespace whose root is the unprivileged sandbox uid, never host root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

from corral.compute.commands import _starttime, keep_child, reap_all
from corral.compute.files import RootedPath
from corral.compute.local import _sys, rootfs
from corral.compute.local.cgroups import CgroupDriver, Cgroups
from corral.compute.local.storage import LayerStore, is_mountpoint, open_layer_store
from corral.compute.provider import Provider, SealedLayer, Spawn, supervised
from corral.compute.types import WORKSPACE, Hooks, Limits
from corral.errors import MissingTool, SandboxError, StorageError, UsageError
from corral.settings import Settings
from corral.store.models import SandboxRow, SnapshotRow

#: tool -> Debian package that provides it
TOOLS = {
    "bwrap": "bubblewrap",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "ip": "iproute2",
    "cp": "coreutils",
}

_INIT_TIMEOUT = 10.0
# <asm-generic/ioctls.h>
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


def require_tools(names: list[str] | None = None) -> None:
    """Raise ``MissingTool`` naming the package for the first missing binary."""
    for tool in names or list(TOOLS):
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} is not installed: apt-get install {TOOLS[tool]}")


def _run(argv: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise SandboxError(f"{what} failed: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r


class LocalProvider(Provider):
    """Sandboxes made of namespaces, overlays and cgroups on this host."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if os.geteuid() != 0:
            raise MissingTool("the local sandbox provider needs root (it mounts and makes "
                              "namespaces); run as root or use another provider")
        require_tools()
        self._layers: LayerStore | None = None
        self._cgroups: CgroupDriver | None = None

    # -- shared machinery --------------------------------------------------------
    @property
    def layers(self) -> LayerStore:
        if self._layers is None:
            self._layers = open_layer_store(self.settings)
        return self._layers

    @property
    def cgroups(self) -> CgroupDriver:
        if self._cgroups is None:
            self._cgroups = CgroupDriver()
        return self._cgroups

    def _dir(self, row: SandboxRow) -> Path:
        return self.settings.home / "sandboxes" / row.id

    def _rootfs(self, row: SandboxRow) -> Path:
        return self._dir(row) / "rootfs"

    def netns_path(self, row: SandboxRow) -> Path | None:
        return self._dir(row) / "netns"

    def _base_lowers(self, spec: dict[str, Any]) -> list[str]:
        base = spec.get("base", "host")
        if base != "host":
            image = self.layers.root / "images" / str(base)
            if not image.is_dir():
                raise UsageError(f"no imported image {base!r} (corral env import)")
            return [self._image_mask(str(base)), f"images/{base}"]
        return [self._host_mask(), "/"]

    def _host_mask(self) -> str:
        key = rootfs.host_mask_key(self.settings.home, self.settings.sandbox_uid)
        rel = f"base/host-{key}"
        dest = self.layers.root / rel
        if not dest.exists():
            lock = self.layers.root / "base" / ".lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not dest.exists():
                    rootfs.build_host_mask(dest, self.settings.home, self.settings.sandbox_uid)
            finally:
                os.close(fd)
        return rel

    def _image_mask(self, name: str) -> str:
        rel = f"base/image-{name}-{self.settings.sandbox_uid}"
        dest = self.layers.root / rel
        if not dest.exists():
            rootfs.build_image_mask(dest, self.layers.root / "images" / name,
                                    self.settings.sandbox_uid)
        return rel

    # -- lifecycle ---------------------------------------------------------------
    def create(self, row: SandboxRow, *, workspace: Path | None,
               snapshot: SnapshotRow | None, hooks: Hooks) -> None:
        store = self.layers
        d = self._dir(row)
        d.mkdir(parents=True, mode=0o700)
        row.runtime["storage"] = store.kind
        if snapshot is not None:
            row.lowers = store.new_sandbox(row.id, snapshot.layer, list(snapshot.lowers))
        else:
            row.lowers = [*store.new_sandbox(row.id, None, []), *self._base_lowers(row.spec)]
        if workspace is not None:
            self._seed_workspace(row, workspace, fresh=snapshot is None)
        cg = self.cgroups.create(f"corral-{row.id}", Limits.from_json(row.limits))
        row.runtime["cgroups"] = cg.to_json()
        self._make_netns(row)
        self._mount(row)
        if hooks.files:
            rooted = RootedPath(self._rootfs(row), None)
            for path, data in hooks.files.items():
                _write_root_file(rooted, path, data)
        self._start_init(row)

    def _seed_workspace(self, row: SandboxRow, src: Path, *, fresh: bool) -> None:
        ws = self.layers.upper(row.id) / WORKSPACE.lstrip("/")
        # the upper dir is corral's own; its top-level entry may come from a snapshot
        if ws.is_symlink() or ws.is_file():
            ws.unlink()
        elif ws.exists():
            shutil.rmtree(ws)
        ws.mkdir(mode=0o755)
        if not fresh:
            os.setxattr(ws, "trusted.overlay.opaque", b"y")
        r = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(ws)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            err = r.stderr.strip()
            if "No space" in err:
                from corral.errors import OutOfSpace

                raise OutOfSpace(f"out of space copying the workspace {src}")
            raise SandboxError(f"copying the workspace {src} failed: {err}")
        uid = self.settings.sandbox_uid
        _run(["chown", "-R", "-h", f"{uid}:{uid}", str(ws)], "handing the workspace to the "
             "sandbox user")
        # `cp -a DIR/.` also copies DIR's own mode (0700 for a mkdtemp dir)
        ws.chmod(0o755)

    def _make_netns(self, row: SandboxRow) -> None:
        ns = self.netns_path(row)
        assert ns is not None
        if ns.exists() and is_mountpoint(ns):
            return
        ns.touch(mode=0o600)
        _run(["unshare", f"--net={ns}", "ip", "link", "set", "lo", "up"],
             "making the network namespace")

    def _drop_netns(self, row: SandboxRow) -> None:
        ns = self.netns_path(row)
        assert ns is not None
        if is_mountpoint(ns):
            r = subprocess.run(["umount", str(ns)], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(ns)], capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            ns.unlink()

    def _mount(self, row: SandboxRow) -> None:
        target = self._rootfs(row)
        if is_mountpoint(target):
            return
        target.mkdir(exist_ok=True, mode=0o755)
        store = self.layers
        lowers = [str(store.path(layer)) for layer in row.lowers]
        for layer, path in zip(row.lowers, lowers, strict=True):
            if not Path(path).is_dir():
                raise StorageError(f"layer {layer} of sandbox {row.id} is missing",
                                   sandbox_id=row.id)
        opts = (f"lowerdir={':'.join(lowers)},upperdir={store.upper(row.id)},"
                f"workdir={store.work(row.id)},index=off,metacopy=off")
        if len(opts) > 4000:
            raise StorageError(f"sandbox {row.id} has too many layers ({len(row.lowers)}) "
                               "to mount", sandbox_id=row.id)
        try:
            _sys.mount("overlay", str(target), "overlay", _sys.MS_NOSUID | _sys.MS_NODEV, opts)
        except OSError as exc:
            raise SandboxError(f"mounting the sandbox filesystem failed: {exc.strerror}",
                               sandbox_id=row.id) from exc

    def _umount(self, row: SandboxRow) -> None:
        target = self._rootfs(row)
        for _ in range(50):
            try:
                _sys.umount(str(target))
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # not a mount point: done
                    return
                if exc.errno == errno.ENOENT:
                    return
                reap_all()
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            _sys.umount(str(target), detach=True)

    def _cg(self, row: SandboxRow) -> Cgroups:
        data = row.runtime.get("cgroups")
        if not data:  # a create that died before saving them: they have a fixed name
            return self.cgroups.find(f"corral-{row.id}")
        return Cgroups.from_json(data)

    def _start_init(self, row: SandboxRow) -> None:
        cg = self._cg(row)
        if not cg.dirs or not cg.exists():
            cg = self.cgroups.create(f"corral-{row.id}", Limits.from_json(row.limits))
            row.runtime["cgroups"] = cg.to_json()
        # a crash mid-snapshot can leave the cgroup frozen: an init joining it would
        # freeze before exec, and Popen would wait for that exec forever
        with contextlib.suppress(OSError):
            cg.thaw()
        self._make_netns(row)
        self._mount(row)
        r, w = os.pipe()
        argv = [
            "nsenter", f"--net={self.netns_path(row)}", "--",
            "bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--bind", str(self._rootfs(row)), "/", "--proc", "/proc", "--dev", "/dev",
        ]
        for path in row.spec.get("expose", []):
            argv += ["--ro-bind", path, path]
        # the init's cwd is where `nsenter -w` puts commands: no chdir step for the
        # default, unless the agent made /workspace unreachable for the capless init
        init_cwd = WORKSPACE if _traversable(self._rootfs(row), WORKSPACE) else "/"
        row.runtime["init_cwd"] = init_cwd
        argv += ["--chdir", init_cwd, "--hostname", "corral", "--cap-drop", "ALL",
                 "--info-fd", str(w),
                 "--", "/bin/sleep", "infinity"]
        log = self._dir(row) / "init.log"
        try:
            with log.open("wb") as logf:
                proc = subprocess.Popen(
                    _joining(cg, argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(w,), start_new_session=True, env=_clean_env(),
                )
        finally:
            os.close(w)
        keep_child(proc)
        try:
            info = _read_info(r, proc, _INIT_TIMEOUT)
        finally:
            os.close(r)
        if info is None:
            proc.poll()
            with contextlib.suppress(Exception):
                cg.kill()
            detail = log.read_text(errors="replace").strip().splitlines()
            raise SandboxError(
                f"the sandbox init did not start: {detail[-1] if detail else 'no output'}",
                sandbox_id=row.id)
        pid = int(info["child-pid"])
        # bwrap reports its pid before it has finished building the sandbox; the
        # sandbox is ready once the init command itself has been exec'd
        if not _wait_exec(pid, b"sleep", proc, _INIT_TIMEOUT):
            with contextlib.suppress(Exception):
                cg.kill()
            detail = log.read_text(errors="replace").strip().splitlines()
            raise SandboxError(
                f"the sandbox init did not start: {detail[-1] if detail else 'no output'}",
                sandbox_id=row.id)
        row.runtime.update(init_pid=pid, init_start=_starttime(pid), launcher_pid=proc.pid)

    def start(self, row: SandboxRow) -> None:
        self._start_init(row)

    def stop(self, row: SandboxRow) -> None:
        cg = self._cg(row)
        if cg.dirs:
            cg.kill()
            # a paused sandbox's cgroup stays frozen after the kill: a new init
            # joining it would freeze before it could exec
            cg.thaw()
        reap_all()
        row.runtime.pop("init_pid", None)
        row.runtime.pop("init_start", None)

    def pause(self, row: SandboxRow) -> None:
        self._cg(row).freeze()

    def unpause(self, row: SandboxRow) -> None:
        self._cg(row).thaw()

    def is_frozen(self, row: SandboxRow) -> bool:
        cg = self._cg(row)
        try:
            return bool(cg.dirs) and cg.frozen()
        except OSError:
            return False

    def destroy(self, row: SandboxRow) -> None:
        cg = self._cg(row)
        if cg.dirs:
            cg.kill()
            cg.remove()
        reap_all()
        self._umount(row)
        self._drop_netns(row)
        if row.runtime.get("storage") or self._layers is not None \
                or (self.settings.home / "storage.json").exists():
            self.layers.drop_sandbox(row.id)
        d = self._dir(row)
        if d.exists():
            if is_mountpoint(self._rootfs(row)):
                raise SandboxError(f"{self._rootfs(row)} is still mounted; not removing",
                                   sandbox_id=row.id)
            shutil.rmtree(d)

    def is_alive(self, row: SandboxRow) -> bool:
        pid = row.runtime.get("init_pid")
        if not pid:
            return False
        start = _starttime(int(pid))
        return start is not None and start == row.runtime.get("init_start")

    # -- processes ---------------------------------------------------------------
    def spawn(self, row: SandboxRow, spec: Spawn) -> subprocess.Popen[bytes]:
        pid = row.runtime.get("init_pid")
        if not pid:
            raise SandboxError("sandbox has no init process", sandbox_id=row.id)
        uid = self.settings.sandbox_uid
        priv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--no-new-privs"]
        if spec.user == "root":
            priv += ["--", "unshare", "--user", "--map-root-user"]
        else:
            priv += ["--bounding-set=-all", "--inh-caps=-all"]
        init_cwd = row.runtime.get("init_cwd", WORKSPACE)
        chdir = [] if spec.cwd == init_cwd else ["env", "-C", spec.cwd, "--"]
        argv = ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                "--", *priv, "--", *chdir, *spec.argv]
        argv = supervised(argv, spec.exit_file)
        if spec.tty_fd is None:
            # no preexec_fn: it makes Python fork() the whole parent instead of vfork(),
            # ~15 ms of CPU per command in a process the size of the orchestrator
            return subprocess.Popen(
                _joining(self._cg(row), argv), stdin=spec.stdin, stdout=spec.stdout,
                stderr=spec.stderr, start_new_session=True, env=dict(spec.env),
            )
        fds = self._cg(row).open_procs()
        try:
            return subprocess.Popen(
                argv, stdin=spec.tty_fd, stdout=spec.tty_fd, stderr=spec.tty_fd,
                start_new_session=True, preexec_fn=_joiner(fds, tty=True),
                env=dict(spec.env),
            )
        finally:
            for fd in fds:
                os.close(fd)

    def open_pty(self, row: SandboxRow) -> tuple[int, int]:
        """A pty pair on the sandbox's own devpts (so /dev/pts/N exists inside).

        The master comes from the sandbox's ptmx, reached through its init's root;
        the slave from TIOCGPTPEER, without any path lookup.
        """
        pid = row.runtime.get("init_pid")
        ptmx = f"/proc/{pid}/root/dev/pts/ptmx"
        try:
            master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return os.openpty()
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
            slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            os.close(master)
            return os.openpty()
        return master, int(slave)

    # -- filesystem --------------------------------------------------------------
    def root(self, row: SandboxRow) -> Path:
        target = self._rootfs(row)
        if not is_mountpoint(target):
            self._mount(row)
        return target

    # -- snapshots ---------------------------------------------------------------
    def snapshot(self, row: SandboxRow, snapshot_id: str) -> SealedLayer:
        cg = self._cg(row)
        thaw = False
        if self.is_alive(row) and cg.dirs and not cg.frozen():
            cg.freeze()
            thaw = True
        # the page cache is coherent: once frozen, nothing is in flight to seal
        try:
            layer, size = self.layers.seal(row.id, snapshot_id)
        finally:
            if thaw:
                cg.thaw()
        return SealedLayer(layer=layer, lowers=list(row.lowers), size_bytes=size)

    def restore(self, row: SandboxRow, snapshot: SnapshotRow) -> None:
        self._umount(row)
        self.layers.drop_sandbox(row.id)
        row.lowers = self.layers.new_sandbox(row.id, snapshot.layer, list(snapshot.lowers))
        self._mount(row)

    def delete_snapshot(self, snapshot: SnapshotRow) -> None:
        self.layers.drop_layer(snapshot.layer)

    def stats(self, row: SandboxRow) -> dict[str, Any]:
        out = self._cg(row).stats()
        out["storage"] = row.runtime.get("storage")
        out["layers"] = len(row.lowers)
        return out


def _wait_exec(pid: int, comm: bytes, launcher: subprocess.Popen[bytes], timeout: float
               ) -> bool:
    """Wait until a child of ``pid`` runs the program named ``comm``."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
                kids = f.read().split()
            for kid in kids:
                with open(f"/proc/{int(kid)}/comm", "rb") as f:
                    if f.read().strip() == comm:
                        return True
        except (FileNotFoundError, ProcessLookupError):
            pass
        if launcher.poll() is not None:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.001)  # bwrap needs a few ms: poll finely
    return False


def _traversable(root: Path, path: str) -> bool:
    """Whether a process without capabilities (any uid) can enter ``path``."""
    import stat as st

    try:
        with RootedPath(root).parent(path) as (dfd, name):
            info = os.stat(name or ".", dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return st.S_ISDIR(info.st_mode) and bool(info.st_mode & st.S_IXOTH)


#: the host's /bin/sh with a fixed script: join the cgroups named by the arguments
#: (writing "0" moves the writer), then become the command
_JOIN = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || { echo "corral: cannot '
         'join the sandbox cgroup $1" >&2; exit 125; }; shift; n=$((n - 1)); done; exec "$@"')


def _joining(cg: Cgroups, argv: list[str]) -> list[str]:
    """``argv`` run inside the sandbox's cgroups, joined before it execs."""
    procs = [str(Path(d) / "cgroup.procs") for d in cg.dirs.values()]
    return ["/bin/sh", "-c", _JOIN, "corral-join", str(len(procs)), *procs, *argv]


def _joiner(fds: list[int], tty: bool = False) -> Any:
    """A preexec function: join the sandbox's cgroups (and take the tty) before exec."""

    def join() -> None:
        for fd in fds:
            os.write(fd, b"0")
        if tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return join


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def _read_info(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if chunk:
            buf += chunk
            try:
                info: dict[str, Any] = json.loads(buf)
                return info
            except ValueError:
                continue
        return None


def _write_root_file(rooted: RootedPath, path: str, data: bytes) -> None:
    """Write a root-owned, read-only-for-the-sandbox file (a hook file)."""
    with rooted.parent(path, make_parents=True) as (dfd, name):
        if not name:
            raise UsageError(f"hook file path {path!r} names a directory")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dfd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
