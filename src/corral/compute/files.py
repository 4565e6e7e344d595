"""``sbx.files``: read and write a sandbox's files from the host, safely.

The sandbox's tree is untrusted. Paths are resolved the way the kernel would
resolve them *inside* the sandbox (a chroot): ``..`` stops at the sandbox root
and symlinks, absolute or relative, resolve within it. Every step opens the
next component with ``O_NOFOLLOW`` relative to a directory fd already held, so a
symlink swapped in by a process in the sandbox cannot lead the host outside.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import stat
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from corral.compute import states
from corral.compute.provider import get_provider
from corral.compute.states import SandboxState
from corral.compute.types import WORKSPACE, FileEntry
from corral.errors import NotFound, SandboxError, UsageError

if TYPE_CHECKING:
    from corral.compute.sandbox import Sandbox

_MAX_LINKS = 40
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RootedPath:
    """Resolve paths inside a directory treated as ``/`` (chroot semantics)."""

    def __init__(self, root: Path, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.owner = owner

    @contextmanager
    def parent(
        self, path: str, *, follow_last: bool = True, make_parents: bool = False
    ) -> Iterator[tuple[int, str]]:
        """Yield ``(dir_fd, name)``: the directory holding ``path``'s last component.

        ``name`` is ``""`` when ``path`` is the root itself. Raises
        ``FileNotFoundError`` / ``NotADirectoryError`` / ``OSError(ELOOP)``.
        """
        root_fd = os.open(self.root, _DIR_FLAGS)
        stack = [root_fd]
        try:
            parts = deque(_split(path))
            links = 0
            while parts:
                name = parts.popleft()
                if name == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                cur = stack[-1]
                last = not parts
                try:
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        yield cur, name
                        return
                    if not make_parents:
                        raise
                    os.mkdir(name, 0o755, dir_fd=cur)
                    if self.owner:
                        os.chown(name, *self.owner, dir_fd=cur, follow_symlinks=False)
                    parts.appendleft(name)
                    continue
                if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                    links += 1
                    if links > _MAX_LINKS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                    target = os.readlink(name, dir_fd=cur)
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    parts.extendleft(reversed(_split(target)))
                    continue
                if last:
                    yield cur, name
                    return
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=cur)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        parts.appendleft(name)  # swapped under us: look again
                        links += 1
                        if links > _MAX_LINKS:
                            raise
                        continue
                    raise
                stack.append(fd)
            yield stack[-1], ""
        finally:
            for fd in stack:
                os.close(fd)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists inside the root (symlinks resolved inside it)."""
        try:
            with self.parent(path) as (dfd, name):
                if name:
                    os.stat(name, dir_fd=dfd, follow_symlinks=False)
                return True
        except OSError:
            return False

    def open_dir(self, path: str) -> int:
        """A readable fd on the directory at ``path`` (caller closes)."""
        with self.parent(path) as (dfd, name):
            if not name:
                return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
            return os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)


def _split(path: str) -> list[str]:
    if "\x00" in path:
        raise UsageError("path contains a NUL byte")
    return [p for p in path.split("/") if p not in ("", ".")]


def _abs(path: str, cwd: str = WORKSPACE) -> str:
    p = PurePosixPath(path)
    return str(p if p.is_absolute() else PurePosixPath(cwd) / p)


class Files:
    """File access for one sandbox (``sbx.files``). Works running, paused or stopped."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def _rooted(self) -> RootedPath:
        row = self._sbx._row()
        states.check("files", SandboxState(row.state), self._sbx.id)
        prov = get_provider(row.provider, self._sbx._ctx.settings)  # one read of the row
        return RootedPath(prov.root(row), prov.owner(row))

    def _err(self, exc: OSError, path: str) -> Exception:
        sid = self._sbx.id
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"no such file in sandbox {sid}: {path}", sandbox_id=sid)
        if isinstance(exc, IsADirectoryError):
            return UsageError(f"{path} is a directory", sandbox_id=sid)
        if isinstance(exc, NotADirectoryError):
            return UsageError(f"a parent of {path} is not a directory", sandbox_id=sid)
        if exc.errno == errno.ELOOP:
            return UsageError(f"too many symbolic links resolving {path}", sandbox_id=sid)
        if exc.errno == errno.ENOSPC:
            from corral.errors import OutOfSpace

            return OutOfSpace(f"no space left writing {path}", sandbox_id=sid)
        return SandboxError(f"{path}: {exc.strerror or exc}", sandbox_id=sid)

    def read(self, path: str) -> bytes:
        """The bytes of a file (symlinks resolve inside the sandbox)."""
        p = _abs(path)
        try:
            with self._rooted().parent(p) as (dfd, name):
                if not name:
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
                return f.read()
        except OSError as exc:
            raise self._err(exc, p) from None

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Create or replace a file; missing parent directories are made.

        New files and directories belong to the sandbox user.
        """
        p = _abs(path)
        payload = data.encode() if isinstance(data, str) else data
        rooted = self._rooted()
        try:
            with rooted.parent(p, make_parents=True) as (dfd, name):
                if not name:
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
                existed = True
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dfd)
                except FileNotFoundError:
                    existed = False
                    fd = os.open(
                        name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        mode, dir_fd=dfd)
                with os.fdopen(fd, "wb") as f:
                    if not existed and rooted.owner:
                        os.fchown(f.fileno(), *rooted.owner)
                        os.fchmod(f.fileno(), mode)
                    f.write(payload)
        except OSError as exc:
            raise self._err(exc, p) from None

    def mkdir(self, path: str) -> None:
        """Make a directory and its missing parents (no error if it exists)."""
        p = _abs(path)
        rooted = self._rooted()
        try:
            with rooted.parent(p, make_parents=True) as (dfd, name):
                if name:
                    try:
                        os.mkdir(name, 0o755, dir_fd=dfd)
                        if rooted.owner:
                            os.chown(name, *rooted.owner, dir_fd=dfd, follow_symlinks=False)
                    except FileExistsError:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        if not stat.S_ISDIR(st.st_mode):
                            raise NotADirectoryError(
                                errno.ENOTDIR, "exists, not a directory") from None
        except OSError as exc:
            raise self._err(exc, p) from None

    def stat(self, path: str) -> FileEntry:
        """What is at ``path`` (a symlink itself, not its target)."""
        p = _abs(path)
        try:
            with self._rooted().parent(p, follow_last=False) as (dfd, name):
                st = os.stat(name or ".", dir_fd=dfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            raise self._err(exc, p) from None
        return _entry(PurePosixPath(p).name or "/", p, st, target)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def list(self, path: str = WORKSPACE, *, recursive: bool = False) -> builtins.list[FileEntry]:
        """Entries of a directory, sorted by name (``recursive``: the whole tree)."""
        p = _abs(path)
        rooted = self._rooted()
        out: builtins.list[FileEntry] = []
        try:
            fd = rooted.open_dir(p)
            self._walk(fd, p, recursive, out)
        except OSError as exc:
            raise self._err(exc, p) from None
        return out

    def _walk(self, fd: int, base: str, recursive: bool, out: builtins.list[FileEntry]) -> None:
        try:
            names = sorted(os.listdir(fd))
            for name in names:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                full = str(PurePosixPath(base) / name)
                out.append(_entry(name, full, st, target))
                if recursive and stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=fd)
                    self._walk(sub, full, True, out)
        finally:
            os.close(fd)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, a symlink, or (``recursive``) a directory tree."""
        p = _abs(path)
        try:
            with self._rooted().parent(p, follow_last=False) as (dfd, name):
                if not name:
                    raise UsageError("refusing to remove the sandbox's root directory")
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if not recursive:
                        try:
                            os.rmdir(name, dir_fd=dfd)
                        except OSError as exc:
                            if exc.errno == errno.ENOTEMPTY:
                                raise UsageError(
                                    f"{p} is a directory that is not empty (use recursive)",
                                    sandbox_id=self._sbx.id) from None
                            raise
                    else:
                        shutil.rmtree(name, dir_fd=dfd)
                else:
                    os.unlink(name, dir_fd=dfd)
        except OSError as exc:
            raise self._err(exc, p) from None

    # -- trees in and out (``corral sandbox cp``) ------------------------------
    def upload(self, src: Path, dst: str) -> int:
        """Copy a host file or directory tree into the sandbox; returns files copied.

        Host symlinks are copied as symlinks (never followed on the host).
        """
        if not src.exists() and not src.is_symlink():
            raise NotFound(f"no such host path: {src}")
        count = 0
        if src.is_dir() and not src.is_symlink():
            self.mkdir(dst)
            for child in sorted(src.iterdir()):
                count += self.upload(child, str(PurePosixPath(_abs(dst)) / child.name))
            return count
        if src.is_symlink():
            self._symlink(os.readlink(src), dst)
            return 1
        self.write(dst, src.read_bytes(), mode=src.stat().st_mode & 0o777)
        return 1

    def _symlink(self, target: str, path: str) -> None:
        p = _abs(path)
        rooted = self._rooted()
        try:
            with rooted.parent(p, follow_last=False, make_parents=True) as (dfd, name):
                os.symlink(target, name, dir_fd=dfd)
                if rooted.owner:
                    os.chown(name, *rooted.owner, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise self._err(exc, p) from None

    def download(self, src: str, dst: Path) -> int:
        """Copy a sandbox file or tree to the host; returns files copied.

        Symlinks in the sandbox are recreated as symlinks, never followed.
        """
        entry = self.stat(src)
        if entry.type == "dir":
            dst.mkdir(parents=True, exist_ok=True)
            count = 0
            for child in self.list(entry.path):
                count += self.download(child.path, dst / child.name)
            return count
        if entry.type == "symlink":
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(entry.target or "")
            return 1
        if entry.type != "file":
            return 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.corral-tmp")
        tmp.write_bytes(self.read(entry.path))
        tmp.chmod(entry.mode & 0o777)
        tmp.replace(dst)
        return 1


def _entry(name: str, path: str, st: os.stat_result, target: str | None) -> FileEntry:
    m = st.st_mode
    kind = ("dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m)
            else "symlink" if stat.S_ISLNK(m) else "other")
    return FileEntry(name=name, path=path, type=kind, size=st.st_size, mode=m,
                     mtime=st.st_mtime, target=target)
