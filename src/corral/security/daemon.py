"""The proxy daemon: one host process per installation (``$CORRAL_HOME``).

    client = DaemonClient(home)
    client.ensure_running()                  # starts ``corral proxy serve`` if needed
    client.attach(sandbox_id, secrets=...)   # listeners in the sandbox's namespace
    client.detach(sandbox_id, forget=True)

The daemon listens on a unix socket only root can reach
(``$CORRAL_HOME/fence/proxy.sock``) and speaks one JSON object per line. It is
restartable: everything it needs to serve a sandbox is in
``$CORRAL_HOME/fence/<id>/`` (the record, the CA, the synthetic names), so on
start it re-attaches every fenced sandbox whose namespace still exists. Once a
second it drops sandboxes whose namespace is gone (destroyed by any process);
it exits when its installation directory disappears, or after ``IDLE_EXIT``
seconds with nothing attached.

Concurrency rules (what keeps two owners off one sandbox's ports):

- One daemon per installation at a time: a daemon holds ``daemon.lock`` for its
  whole life and releases it only after every listener it had is closed; a
  daemon started while an old one is still exiting waits for it.
- A daemon that is exiting first stops answering (its control socket is closed
  and unlinked), refuses attaches that still reach it ("retry": the client
  starts the next daemon) and lets the requests it is serving finish.
- On start, a sandbox whose ``Fence`` is attaching it right now (it holds
  ``fence/<id>/attach.lock``) is left to that ``Fence``: the daemon would
  otherwise attach it without the secret values the ``Fence`` brings.
- Attaching is idempotent (see ``corral.security.proxy.server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.errors import CorralError, SandboxError

__all__ = ["DaemonClient", "ProxyUnavailable", "attach_lock", "creator_busy", "fence_dir",
           "fence_root", "serve"]

log = logging.getLogger("corral.security.daemon")

SOCKET = "proxy.sock"
PIDFILE = "proxy.pid"
LOGFILE = "proxy.log"
#: held by the running daemon for its whole life
DAEMON_LOCK = "daemon.lock"
#: held by a ``Fence`` (in ``fence/<id>/``) while it writes the record and attaches
ATTACH_LOCK = "attach.lock"
START_TIMEOUT = 20.0
#: how long an attach may take before the client gives up (and the Fence destroys the
#: sandbox: it is never left running without its proxy)
ATTACH_TIMEOUT = 60.0
WATCH_INTERVAL = 1.0
#: with no sandbox attached and no request for this long, the daemon exits (the next
#: fenced sandbox starts it again)
IDLE_EXIT = float(os.environ.get("CORRAL_PROXY_IDLE_EXIT", "120"))


class ProxyUnavailable(SandboxError):
    """The proxy daemon cannot be reached or started.

    ``timed_out``: the daemon took the request but did not answer in time (it may
    still be working on it); otherwise it never had it, or dropped it unanswered."""

    def __init__(self, message: str, *, timed_out: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.timed_out = timed_out


def fence_root(home: Path) -> Path:
    return home / "fence"


def fence_dir(home: Path, sandbox_id: str) -> Path:
    return fence_root(home) / sandbox_id


# -- the client side -----------------------------------------------------------------
class DaemonClient:
    """Talks to the daemon of one installation; starts it on demand."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.sock_path = fence_root(home) / SOCKET

    def request(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """One request -> the daemon's answer. Raises ``ProxyUnavailable`` or, for a
        failed operation, ``SandboxError`` with the daemon's message."""
        sid = args.get("sandbox")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.sock_path))
                s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except TimeoutError:
            raise ProxyUnavailable(f"the corral proxy daemon did not answer {op!r} within "
                                   f"{timeout:g}s", timed_out=True, sandbox_id=sid) from None
        except OSError as exc:
            raise ProxyUnavailable(f"the corral proxy daemon is not reachable at "
                                   f"{self.sock_path}: {exc}", sandbox_id=sid) from None
        try:
            answer: dict[str, Any] = json.loads(buf)
        except ValueError:
            raise ProxyUnavailable("the corral proxy daemon gave no answer",
                                   sandbox_id=sid) from None
        if not answer.get("ok"):
            error = f"proxy: {answer.get('error', 'failed')}"
            if answer.get("retry"):
                raise ProxyUnavailable(error, sandbox_id=sid)
            raise SandboxError(error, sandbox_id=sid)
        return answer

    def ping(self) -> dict[str, Any] | None:
        """The running daemon's answer, or None (none runs, or it is exiting)."""
        try:
            return self.request("ping", timeout=5.0)
        except CorralError:
            return None

    def ensure_running(self) -> dict[str, Any]:
        """Start the daemon unless it answers already; returns its ping answer."""
        found = self.ping()
        if found is not None:
            return found
        root = fence_root(self.home)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(root / "start.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            found = self.ping()
            if found is not None:
                return found
            self._spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                found = self.ping()
                if found is not None:
                    return found
                time.sleep(0.05)
        finally:
            os.close(fd)
        tail = _tail(root / LOGFILE)
        why = f": {tail}" if tail else ""
        raise ProxyUnavailable(f"the corral proxy daemon did not start{why}")

    def _spawn(self) -> None:
        root = fence_root(self.home)
        env = dict(os.environ, CORRAL_HOME=str(self.home))
        # `setsid -f` forks the daemon off: it is nobody's child, so no zombie is left
        # behind in the process that happened to start it
        with (root / LOGFILE).open("ab") as logf:
            subprocess.run(
                ["setsid", "-f", sys.executable, "-m", "corral.security.daemon",
                 "--home", str(self.home)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, close_fds=True, env=env,
                cwd="/", check=False)

    def attach(self, sandbox_id: str, secrets: dict[str, tuple[str, list[str]]] | None = None,
               timeout: float = ATTACH_TIMEOUT) -> dict[str, Any]:
        """Have the daemon serve a sandbox (idempotent: attaching an attached sandbox
        only hands over ``secrets``)."""
        return self.request("attach", timeout=timeout, sandbox=sandbox_id,
                            secrets=secrets or {})

    def detach(self, sandbox_id: str, *, forget: bool = False) -> dict[str, Any]:
        return self.request("detach", sandbox=sandbox_id, forget=forget)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the daemon to exit and wait for it; False if none was running."""
        answer = self.ping()
        if answer is None:
            return False
        pid = int(answer.get("pid", 0))
        with contextlib.suppress(CorralError):
            self.request("stop", timeout=5.0)
        deadline = time.monotonic() + timeout
        while pid and time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.05)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process counts as gone
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# -- locks shared by the daemon and the Fence -----------------------------------------
@contextlib.contextmanager
def attach_lock(directory: Path) -> Iterator[None]:
    """Held by the ``Fence`` while it writes a sandbox's record and attaches it: a daemon
    starting meanwhile leaves that sandbox to it (``creator_busy``)."""
    fd = os.open(directory / ATTACH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def creator_busy(directory: Path) -> bool:
    """Whether a ``Fence`` is attaching the sandbox of ``directory`` right now."""
    try:
        fd = os.open(directory / ATTACH_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- the daemon side -------------------------------------------------------------------
class Daemon:
    """The running daemon: a ``ProxyServer`` plus its control socket and watcher."""

    def __init__(self, home: Path) -> None:
        from corral.compute.context import get_context
        from corral.security.audit import AuditLog
        from corral.security.proxy import ProxyServer, Services

        self.home = home
        self.root = fence_root(home)
        ctx = get_context(home)
        self.services = Services(ctx.store, AuditLog.for_home(home))
        self.server = ProxyServer(home, self.services)
        self.stopping = asyncio.Event()
        #: set once the daemon has begun to exit: attaches are refused from then on
        self.closing = False
        self.last_request = time.monotonic()
        self._handlers: set[asyncio.Task[Any]] = set()
        #: handlers still waiting for their request line (cancelled when exiting)
        self._reading: set[asyncio.Task[Any]] = set()
        self._lock_fd: int | None = None
        self._sock_id: tuple[int, int] | None = None

    async def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock_path = self.root / SOCKET
        control: asyncio.AbstractServer | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            await self._take_lock()
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            control = await asyncio.start_unix_server(self._control, path=str(sock_path))
            os.chmod(sock_path, 0o600)
            st = os.stat(sock_path)
            self._sock_id = (st.st_dev, st.st_ino)
            (self.root / PIDFILE).write_text(f"{os.getpid()}\n")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
            await self.reattach_all()
            watcher = asyncio.create_task(self._watch())
            log.info("corral proxy daemon serving %s (pid %d)", self.home, os.getpid())
            await self.stopping.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            if control is not None:
                await self._shut(control, sock_path)
            self._release_lock()
            await self.services.aclose()

    async def _take_lock(self) -> None:
        """Become the one daemon of this installation; wait for one that is exiting."""
        fd = os.open(self.root / DAEMON_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if DaemonClient(self.home).ping() is not None:
                    os.close(fd)
                    raise ProxyUnavailable(f"a corral proxy daemon already serves "
                                           f"{self.home}") from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ProxyUnavailable(f"another corral proxy daemon holds "
                                           f"{self.root / DAEMON_LOCK} and does not answer; "
                                           "stop it first") from None
                await asyncio.sleep(0.05)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _shut(self, control: asyncio.AbstractServer, sock_path: Path) -> None:
        """Stop answering, let running requests finish, close every listener, and only
        then let the next daemon in (by releasing the daemon lock)."""
        self.closing = True
        control.close()
        with contextlib.suppress(OSError):
            st = os.stat(sock_path)
            if (st.st_dev, st.st_ino) == self._sock_id:
                sock_path.unlink()
        with contextlib.suppress(OSError):
            if (self.root / PIDFILE).read_text().strip() == str(os.getpid()):
                (self.root / PIDFILE).unlink()
        for t in self._reading:
            t.cancel()
        pending = [t for t in self._handlers if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=ATTACH_TIMEOUT)
        await self.server.aclose()
        self._release_lock()

    async def reattach_all(self) -> None:
        from corral.security.proxy import FenceRecord

        if not self.root.is_dir():
            return
        for d in sorted(self.root.iterdir()):
            if not (d / "fence.json").is_file():
                continue
            if creator_busy(d):  # its Fence attaches it, with its secrets
                continue
            try:
                record = FenceRecord.load(d)
            except (OSError, ValueError, TypeError):
                continue
            if not Path(record.netns).exists():
                _forget(d)
                continue
            try:
                await self.server.attach(record, d)
            except Exception as exc:  # noqa: BLE001 - one broken sandbox must not stop the rest
                log.warning("cannot re-attach %s: %s", record.sandbox_id, exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not self.home.is_dir():
                log.info("%s is gone; exiting", self.home)
                self.stopping.set()
                return
            if not self.server.attachments and not self._handlers and \
                    time.monotonic() - self.last_request > IDLE_EXIT:
                log.info("no fenced sandbox for %gs; exiting", IDLE_EXIT)
                self.stopping.set()
                return
            for sid, att in list(self.server.attachments.items()):
                if not Path(att.record.netns).exists():
                    await self.server.detach(sid, reason="the sandbox was destroyed")
                    _forget(att.directory)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._reading.add(task)
        self.last_request = time.monotonic()
        try:
            try:
                line = await reader.readline()
            finally:
                self._reading.discard(task)
            self.last_request = time.monotonic()
            try:
                msg = json.loads(line)
                answer = await self._op(msg)
            except CorralError as exc:
                answer = {"ok": False, "error": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:
                log.exception("control request failed")
                answer = {"ok": False, "error": f"internal error: {exc!r}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.last_request = time.monotonic()
            self._handlers.discard(task)
            writer.close()

    async def _op(self, msg: dict[str, Any]) -> dict[str, Any]:
        from corral.security.proxy import FenceRecord

        op = msg.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "sandboxes": sorted(self.server.attachments)}
        if op == "attach":
            sid = str(msg["sandbox"])
            if self.closing:
                return {"ok": False, "retry": True, "error": "the proxy daemon is exiting"}
            d = fence_dir(self.home, sid)
            try:
                record = FenceRecord.load(d)
            except (OSError, ValueError) as exc:
                raise SandboxError(f"no fence record for {sid}: {exc}", sandbox_id=sid) from None
            secrets = {k: (v[0], tuple(v[1])) for k, v in (msg.get("secrets") or {}).items()}
            att = await self.server.attach(record, d, secrets)
            return {"ok": True, "sandbox": sid, "errors": att.errors,
                    "netns": str(att.netns_id), "listeners": att.listener_namespaces()}
        if op == "detach":
            sid = str(msg["sandbox"])
            found = await self.server.detach(sid, reason="detached")
            if msg.get("forget"):
                _forget(fence_dir(self.home, sid))
            return {"ok": True, "detached": found}
        if op == "status":
            return {"ok": True, "pid": os.getpid(), "sandboxes": {
                sid: {"policy": att.record.policy, "transparent": att.record.transparent,
                      "policy_error": att.policy.last_error, "errors": att.errors,
                      "task": att.task_id, "netns": str(att.netns_id),
                      "listeners": att.listener_namespaces()}
                for sid, att in self.server.attachments.items()},
                "upstream_idle": self.services.pool.idle_count()}
        if op == "stop":
            self.stopping.set()
            return {"ok": True}
        raise SandboxError(f"unknown operation {op!r}")


def _forget(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def serve(home: Path) -> None:
    """Run the daemon in the foreground until stopped (``corral proxy serve``)."""
    import resource

    # every client and upstream connection is a file descriptor: take all we may
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _tune_asyncio()
    if os.environ.get("CORRAL_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(Daemon(home).run())
            return
    asyncio.run(Daemon(home).run())


def _tune_asyncio() -> None:
    """asyncio gives every TLS connection a 256 KiB decryption buffer; with thousands of
    kept-alive connections that is most of the daemon's memory. 64 KiB (four TLS
    records) keeps large downloads as fast."""
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", 0) > 64 * 1024:
        sslproto.SSLProtocol.max_size = 64 * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="corral-proxy", description=__doc__)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CORRAL_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from corral.settings import Settings

    home = Settings.from_env(args.home).home
    try:
        serve(home)
    except CorralError as exc:
        print(f"corral proxy: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
