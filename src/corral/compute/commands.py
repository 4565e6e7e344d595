"""``sbx.commands``: run commands inside a sandbox, in the foreground or background."""

from __future__ import annotations

import builtins
import json
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from corral.compute.context import new_id
from corral.compute.provider import Spawn, get_provider
from corral.compute.types import AGENT_HOME, AGENT_USER, WORKSPACE, CommandResult
from corral.errors import CommandTimeout, NotFound, UsageError

if TYPE_CHECKING:
    from corral.compute.sandbox import Sandbox
    from corral.store.models import SandboxRow

OutputCallback = Callable[[bytes], None]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_env(row: SandboxRow, user: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a process in the sandbox starts with: nothing from the host."""
    home = "/root" if user == "root" else AGENT_HOME
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": home,
        "USER": "root" if user == "root" else AGENT_USER,
        "LOGNAME": "root" if user == "root" else AGENT_USER,
        "LANG": "C.UTF-8",
        "HOSTNAME": row.id,
        "CORRAL_SANDBOX_ID": row.id,
    }
    env.update(row.spec.get("env", {}))
    if extra:
        env.update(extra)
    return env


def shell_argv(root: Path, cmd: str | Sequence[str]) -> list[str]:
    """A string runs through bash (sh where the sandbox has no bash); a list runs as is."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise UsageError("empty command")
        shell = "/bin/bash" if _exists_in(root, "/bin/bash") else "/bin/sh"
        return [shell, "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise UsageError("empty command")
    return argv


def _exists_in(root: Path, path: str) -> bool:
    from corral.compute.files import RootedPath

    return RootedPath(root).exists(path)


def exit_status(returncode: int) -> int:
    """Shell convention: a command killed by signal N exits 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Commands:
    """Run commands in the sandbox (``sbx.commands``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    @overload
    def run(
        self, cmd: str | Sequence[str], *, cwd: str = ..., env: Mapping[str, str] | None = ...,
        timeout: float | None = ..., user: str | None = ..., background: Literal[False] = ...,
        stdin: bytes | None = ..., on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
    ) -> CommandResult: ...

    @overload
    def run(
        self, cmd: str | Sequence[str], *, cwd: str = ..., env: Mapping[str, str] | None = ...,
        timeout: float | None = ..., user: str | None = ..., background: Literal[True],
        stdin: bytes | None = ..., on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str = WORKSPACE,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        user: str | None = None,
        background: bool = False,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` (a shell string, or an argv list) inside the sandbox.

        Foreground: blocks and returns a ``CommandResult``; output can also be
        streamed through ``on_stdout`` / ``on_stderr``. Past ``timeout`` seconds
        the command's process group is killed and the result has
        ``timed_out=True`` and exit code 124. Background: returns a
        ``CommandHandle`` at once; the command keeps running after this process
        exits, and ``commands.connect(id)`` finds it again from any process.
        Raises ``InvalidState`` unless the sandbox is running.
        """
        row = self._sbx.ensure_running()
        prov = get_provider(row.provider, self._sbx._ctx.settings)
        who = user or row.spec.get("user", "agent")
        if who not in ("agent", "root"):
            raise UsageError(f"user must be 'agent' or 'root', not {who!r}")
        argv = shell_argv(prov.root(row), cmd)
        full_env = base_env(row, who, env)
        if background:
            return self._background(row, argv, cwd, full_env, who, cmd)
        t0 = time.monotonic()
        proc = prov.spawn(row, Spawn(
            argv=argv, cwd=cwd, env=full_env, user=who,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        ))
        out, err, timed_out = _pump(proc, stdin, timeout, on_stdout, on_stderr)
        code = 124 if timed_out else exit_status(proc.returncode)
        return CommandResult(code, out, err, time.monotonic() - t0, timed_out=timed_out)

    # -- background ----------------------------------------------------------
    def _dir(self) -> Path:
        return self._sbx._ctx.home / "sandboxes" / self._sbx.id / "commands"

    def _background(
        self, row: SandboxRow, argv: builtins.list[str], cwd: str, env: dict[str, str], user: str,
        cmd: str | Sequence[str],
    ) -> CommandHandle:
        cid = new_id("cmd", 8)
        d = self._dir() / cid
        d.mkdir(parents=True, mode=0o700)
        with (d / "stdout").open("wb") as out, (d / "stderr").open("wb") as err:
            proc = get_provider(row.provider, self._sbx._ctx.settings).spawn(row, Spawn(
                argv=argv, cwd=cwd, env=env, user=user, stdout=out, stderr=err,
                exit_file=str(d / "exit"),
            ))
        keep_child(proc)
        meta = {
            "id": cid, "pid": proc.pid, "start": _starttime(proc.pid),
            "cmd": cmd if isinstance(cmd, str) else list(cmd), "cwd": cwd,
            "started_at": time.time(),
        }
        (d / "meta.json").write_text(json.dumps(meta))
        return CommandHandle(self._sbx, d, meta)

    def connect(self, command_id: str) -> CommandHandle:
        """The handle of a background command started earlier (from any process)."""
        d = self._dir() / command_id
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFound(
                f"no background command {command_id!r} in sandbox {self._sbx.id}",
                sandbox_id=self._sbx.id) from None
        return CommandHandle(self._sbx, d, meta)

    def list(self) -> builtins.list[CommandHandle]:
        """Background commands started in this sandbox, oldest first."""
        d = self._dir()
        if not d.is_dir():
            return []
        handles = [self.connect(p.name) for p in d.iterdir() if (p / "meta.json").exists()]
        return sorted(handles, key=lambda h: h.started_at)


class CommandHandle:
    """A background command: wait for it, kill it, read or follow its output."""

    def __init__(self, sandbox: Sandbox, directory: Path, meta: dict[str, Any]) -> None:
        self._sbx = sandbox
        self._dir = directory
        self.id: str = meta["id"]
        self.pid: int = meta["pid"]
        self._start: str | None = meta.get("start")
        self.cmd = meta["cmd"]
        self.started_at: float = meta["started_at"]

    def __repr__(self) -> str:
        return f"<CommandHandle {self.id} pid={self.pid} in {self._sbx.id}>"

    def _alive(self) -> bool:
        return _starttime(self.pid) == self._start and _starttime(self.pid) is not None

    def exit_code(self) -> int | None:
        """The exit code, or ``None`` while running. Killed with the sandbox: 137."""
        _reap(self.pid)
        try:
            text = (self._dir / "exit").read_text().strip()
            if text:
                return int(text)
        except (FileNotFoundError, ValueError):
            pass
        if self._alive():
            return None
        try:  # it may have finished between the two checks
            text = (self._dir / "exit").read_text().strip()
            if text:
                return int(text)
        except (FileNotFoundError, ValueError):
            pass
        return 137

    @property
    def running(self) -> bool:
        return self.exit_code() is None

    def stdout(self) -> bytes:
        return (self._dir / "stdout").read_bytes()

    def stderr(self) -> bytes:
        return (self._dir / "stderr").read_bytes()

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the command ends; raises ``CommandTimeout`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while (code := self.exit_code()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise CommandTimeout(
                    f"background command {self.id} still running after {timeout}s",
                    sandbox_id=self._sbx.id)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return CommandResult(code, self.stdout(), self.stderr(), time.time() - self.started_at)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the command's whole process group."""
        if self._alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def iter_output(
        self, *, follow: bool = True, poll: float = 0.02
    ) -> Iterator[tuple[str, bytes]]:
        """Yield ``("stdout" | "stderr", chunk)`` as output arrives; ends with the command."""
        pos = {"stdout": 0, "stderr": 0}
        while True:
            done = self.exit_code() is not None
            got = False
            for name in ("stdout", "stderr"):
                with (self._dir / name).open("rb") as f:
                    f.seek(pos[name])
                    chunk = f.read()
                if chunk:
                    pos[name] += len(chunk)
                    got = True
                    yield name, chunk
            if done or not follow:
                if not got:
                    return
                continue
            if not got:
                time.sleep(poll)


# -- plumbing -------------------------------------------------------------------
_children: list[subprocess.Popen[bytes]] = []
_children_lock = threading.Lock()


def keep_child(proc: subprocess.Popen[bytes]) -> None:
    """Hold on to a detached child so it can be reaped (no zombies in long-lived hosts)."""
    with _children_lock:
        _children[:] = [p for p in _children if p.poll() is None]
        _children.append(proc)


def reap_all() -> None:
    """Poll every detached child corral keeps, collecting the ones that ended."""
    with _children_lock:
        _children[:] = [p for p in _children if p.poll() is None]


def _reap(pid: int) -> None:
    with _children_lock:
        for p in _children:
            if p.pid == pid:
                p.poll()


def _starttime(pid: int) -> str | None:
    """The start time of ``pid`` (guards against pid reuse), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return fields[19].decode()


def _pump(
    proc: subprocess.Popen[bytes],
    stdin: bytes | None,
    timeout: float | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> tuple[bytes, bytes, bool]:
    """Collect (and stream) a process's output until it exits or times out."""
    if stdin is not None and proc.stdin is not None:
        pipe = proc.stdin

        def feed() -> None:
            try:
                pipe.write(stdin)
                pipe.close()
            except (BrokenPipeError, ValueError):
                pass

        threading.Thread(target=feed, daemon=True).start()
    out_fd = proc.stdout.fileno() if proc.stdout is not None else -1
    err_fd = proc.stderr.fileno() if proc.stderr is not None else -2
    bufs: dict[int, list[bytes]] = {}
    calls: dict[int, OutputCallback | None] = {}
    sel = selectors.DefaultSelector()
    for stream, cb in ((proc.stdout, on_stdout), (proc.stderr, on_stderr)):
        if stream is not None:
            fd = stream.fileno()
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
            bufs[fd] = []
            calls[fd] = cb
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    open_fds = len(bufs)
    while open_fds:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = sel.select(wait)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            _kill_group(proc)
            break
        for key, _ in ready:
            fd = int(key.fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(fd)
                open_fds -= 1
                continue
            bufs[fd].append(chunk)
            cb = calls[fd]
            if cb is not None:
                cb(chunk)
    sel.close()
    if timed_out:
        proc.wait()
    else:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            proc.wait(left)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return b"".join(bufs.get(out_fd, [])), b"".join(bufs.get(err_fd, [])), timed_out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
