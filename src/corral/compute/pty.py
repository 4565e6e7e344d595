"""``sbx.pty``: interactive terminals inside a sandbox."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corral.compute.commands import base_env, exit_status
from corral.compute.provider import Spawn, get_provider
from corral.compute.types import WORKSPACE
from corral.errors import CommandTimeout

if TYPE_CHECKING:
    from corral.compute.sandbox import Sandbox


class Pty:
    """A terminal session: a process with a pseudo-terminal as its controlling tty."""

    def __init__(self, sandbox_id: str, master: int, proc: subprocess.Popen[bytes]) -> None:
        self.sandbox_id = sandbox_id
        self._master = master
        self._proc = proc
        self.pid = proc.pid

    def fileno(self) -> int:
        return self._master

    def write(self, data: bytes | str) -> None:
        """Send keystrokes (bytes, or text encoded as UTF-8)."""
        buf = data.encode() if isinstance(data, str) else data
        while buf:
            n = os.write(self._master, buf)
            buf = buf[n:]

    def read(self, size: int = 65536, timeout: float | None = None) -> bytes:
        """What the terminal printed; ``b""`` on timeout or once the process is gone."""
        r, _, _ = select.select([self._master], [], [], timeout)
        if not r:
            return b""
        try:
            return os.read(self._master, size)
        except OSError:  # EIO: the other side closed
            return b""

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """Read until ``marker`` shows up; raises ``CommandTimeout`` otherwise."""
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandTimeout(
                    f"terminal did not print {marker!r} within {timeout}s; got {buf[-200:]!r}",
                    sandbox_id=self.sandbox_id)
            chunk = self.read(timeout=left)
            if not chunk and self._proc.poll() is not None:
                break
            buf += chunk
        return buf

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size; the process gets SIGWINCH."""
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def size(self) -> tuple[int, int]:
        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(self._master, termios.TIOCGWINSZ, b"\0" * 8))
        return cols, rows

    def wait(self, timeout: float | None = None) -> int:
        """The exit code of the terminal's process."""
        try:
            return exit_status(self._proc.wait(timeout))
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"terminal process still running after {timeout}s",
                                 sandbox_id=self.sandbox_id) from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Hang up: the process gets SIGHUP, then is killed if it lingers."""
        with contextlib.suppress(OSError):
            os.close(self._master)
        try:
            self._proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.kill()
            self._proc.wait()

    def __enter__(self) -> Pty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PtyApi:
    """Open terminals in a sandbox (``sbx.pty``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def open(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        cmd: Sequence[str] | None = None,
        cwd: str = WORKSPACE,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> Pty:
        """Start ``cmd`` (default: an interactive login shell) on a new terminal."""
        row = self._sbx.ensure_running()
        prov = get_provider(row.provider, self._sbx._ctx.settings)
        who = user or row.spec.get("user", "agent")
        master, slave = prov.open_pty(row)
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            argv = list(cmd) if cmd else _login_shell(prov.root(row))
            full_env = base_env(row, who, {"TERM": "xterm-256color", **(env or {})})
            proc = prov.spawn(row, Spawn(argv=argv, cwd=cwd, env=full_env, user=who,
                                         stdin=None, stdout=None, stderr=None, tty_fd=slave))
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_inheritable(master, False)
        return Pty(self._sbx.id, master, proc)


def _login_shell(root: Path) -> list[str]:
    from corral.compute.files import RootedPath

    if RootedPath(root).exists("/bin/bash"):
        return ["/bin/bash", "-l"]
    return ["/bin/sh", "-l"]
