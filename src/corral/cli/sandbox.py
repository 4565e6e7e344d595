"""``corral sandbox ...``: create, drive and inspect sandboxes."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli._output import console, emit_json, fail, parse_kv

app = typer.Typer(help="Create, drive and inspect sandboxes.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
SandboxId = Annotated[str, typer.Argument(help="Sandbox id (see `corral sandbox ls`).")]


def _connect(sid: str) -> Any:
    from corral.compute import Sandbox

    return Sandbox.connect(sid)


@app.command()
def create(
    env: Annotated[str, typer.Option(help="Environment: 'default' or one built with "
                                     "`corral env build`.")] = "default",
    workspace: Annotated[Path | None, typer.Option(
        help="Seed /workspace from this directory (only read, never written).")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU limit, in cores.")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 512M or 2G.")] = None,
    pids: Annotated[int | None, typer.Option(help="Maximum number of processes.")] = None,
    meta: Annotated[list[str] | None, typer.Option(help="Metadata KEY=VALUE (repeatable).")
                    ] = None,
    user: Annotated[str, typer.Option(help="Default user for commands: agent or root.")
                    ] = "agent",
    expose: Annotated[list[str] | None, typer.Option(
        help="Host path to mount read-only at the same place (repeatable).")] = None,
    policy: Annotated[Path | None, typer.Option(
        help="Start the sandbox inside this security policy (see docs/policy.md).")] = None,
    json: Json = False,
) -> None:
    """Create and start a sandbox."""
    from corral.compute import Limits, Sandbox

    try:
        limits = Limits.parse(cpus, memory, pids)
    except ValueError as exc:
        fail(str(exc), 2)
    metadata = parse_kv(meta, "--meta")
    if policy is not None:
        try:
            from corral.security.fence import Fence
        except ImportError:
            fail("--policy needs the security layer, which is not installed", 2)
        sbx = Fence.from_file(policy).create_sandbox(
            env=env, workspace=workspace, limits=limits, metadata=metadata, user=user,
            expose=expose or [])
    else:
        sbx = Sandbox.create(env=env, workspace=workspace, limits=limits, metadata=metadata,
                             user=user, expose=expose or [])
    if json:
        emit_json(sbx.info())
    else:
        console.print(sbx.id)


@app.command(name="exec")
def exec_(
    sandbox_id: SandboxId,
    cmd: Annotated[list[str], typer.Argument(help="Command and arguments (after --). A "
                                             "single argument with spaces runs in bash.")],
    cwd: Annotated[str, typer.Option(help="Working directory inside the sandbox.")
                   ] = "/workspace",
    env: Annotated[list[str] | None, typer.Option(help="Environment KEY=VALUE (repeatable).")
                   ] = None,
    timeout: Annotated[float | None, typer.Option(help="Kill after this many seconds.")
                       ] = None,
    background: Annotated[bool, typer.Option(help="Start it and return at once.")] = False,
    user: Annotated[str | None, typer.Option(help="agent or root.")] = None,
    json: Json = False,
) -> int:
    """Run a command in a sandbox; streams its output and exits with its exit code."""
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        fail("no command given (corral sandbox exec ID -- CMD [ARG...])", 2)
    sbx = _connect(sandbox_id)
    run_cmd: str | list[str] = cmd[0] if len(cmd) == 1 and " " in cmd[0] else cmd
    envs = parse_kv(env, "--env")
    if background:
        h = sbx.commands.run(run_cmd, cwd=cwd, env=envs, user=user, background=True)
        if json:
            emit_json({"id": h.id, "pid": h.pid, "sandbox": sbx.id})
        else:
            console.print(h.id)
        return 0
    if json:
        r = sbx.commands.run(run_cmd, cwd=cwd, env=envs, timeout=timeout, user=user)
        emit_json(r.to_json())
        return int(r.exit_code)

    def out(b: bytes) -> None:
        sys.stdout.buffer.write(b)
        sys.stdout.buffer.flush()

    def err(b: bytes) -> None:
        sys.stderr.buffer.write(b)
        sys.stderr.buffer.flush()

    stdin = None if sys.stdin.isatty() else sys.stdin.buffer.read()
    r = sbx.commands.run(run_cmd, cwd=cwd, env=envs, timeout=timeout, user=user,
                         on_stdout=out, on_stderr=err, stdin=stdin)
    if r.timed_out:
        sys.stderr.write(f"corral: command timed out after {timeout}s\n")
    return int(r.exit_code)


@app.command()
def shell(
    sandbox_id: SandboxId,
    user: Annotated[str | None, typer.Option(help="agent or root.")] = None,
    cwd: Annotated[str, typer.Option(help="Starting directory.")] = "/workspace",
) -> int:
    """An interactive terminal in the sandbox."""
    import shutil
    import termios
    import tty

    sbx = _connect(sandbox_id)
    cols, rows = shutil.get_terminal_size((80, 24))
    term = sbx.pty.open(cols=cols, rows=rows, cwd=cwd, user=user)
    stdin_fd = sys.stdin.fileno()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None

    def on_winch(*_: object) -> None:
        c, r = shutil.get_terminal_size((80, 24))
        with contextlib.suppress(OSError):
            term.resize(c, r)

    old_handler = signal.signal(signal.SIGWINCH, on_winch)
    try:
        if is_tty:
            tty.setraw(stdin_fd, termios.TCSADRAIN)
        fds = [term.fileno(), stdin_fd]
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if term.fileno() in ready:
                try:
                    data = os.read(term.fileno(), 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin_fd in ready:
                data = os.read(stdin_fd, 65536)
                if not data:
                    fds = [term.fileno()]
                    term.write(b"\x04")
                    continue
                term.write(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_handler)
    code = term.wait(5)
    term.close()
    return int(code)


def _split_ref(ref: str) -> tuple[str | None, str]:
    """``ID:/path`` -> (ID, path); a plain path -> (None, path)."""
    head, sep, tail = ref.partition(":")
    if sep and head.startswith("sb-") and "/" not in head:
        return head, tail or "/workspace"
    return None, ref


@app.command()
def cp(
    src: Annotated[str, typer.Argument(help="ID:/path in a sandbox, or a host path.")],
    dst: Annotated[str, typer.Argument(help="ID:/path in a sandbox, or a host path.")],
    json: Json = False,
) -> None:
    """Copy files or directory trees between the host and sandboxes."""
    s_id, s_path = _split_ref(src)
    d_id, d_path = _split_ref(dst)
    if s_id is None and d_id is None:
        fail("one side of cp must be a sandbox path, ID:/path", 2)
    if s_id is None:
        n = _connect(d_id or "").files.upload(Path(s_path), d_path)
    elif d_id is None:
        sbx = _connect(s_id)
        target = Path(d_path)
        entry = sbx.files.stat(s_path)
        if target.is_dir() and entry.type != "dir":
            target = target / entry.name
        n = sbx.files.download(s_path, target)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src_sbx = _connect(s_id)
            name = src_sbx.files.stat(s_path).name
            src_sbx.files.download(s_path, Path(tmp) / name)
            n = _connect(d_id).files.upload(Path(tmp) / name, d_path)
    if json:
        emit_json({"files": n})
    else:
        console.print(f"copied {n} file{'s' if n != 1 else ''}")


@app.command(name="ls")
def ls(
    meta: Annotated[list[str] | None, typer.Option(help="Only with metadata KEY=VALUE.")
                    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include destroyed sandboxes.")] = False,
    json: Json = False,
) -> None:
    """List sandboxes."""
    from rich.table import Table

    from corral.compute import Sandbox

    boxes = Sandbox.list(metadata=parse_kv(meta, "--meta"), include_destroyed=all_)
    infos = [b.info() for b in boxes]
    if json:
        emit_json(infos)
        return
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "STATE", "ENV", "CREATED", "METADATA"):
        t.add_column(col)
    for i in infos:
        meta_s = " ".join(f"{k}={v}" for k, v in i["metadata"].items())
        t.add_row(i["id"], i["state"], i["env"], i["created_at"][:19], meta_s)
    console.print(t)


@app.command()
def info(sandbox_id: SandboxId, json: Json = False) -> None:
    """Show one sandbox."""
    data = _connect(sandbox_id).info()
    if json:
        emit_json(data)
        return
    for k, v in data.items():
        console.print(f"[bold]{k}[/]: {v}")


def _lifecycle(name: str, doc: str) -> None:
    def cmd(sandbox_id: SandboxId, json: Json = False) -> None:
        sbx = _connect(sandbox_id)
        getattr(sbx, name)()
        state = "destroyed" if name == "destroy" else sbx.state.value
        if json:
            emit_json({"id": sbx.id, "state": state})
        else:
            console.print(f"{sbx.id} {state}")

    cmd.__doc__ = doc
    app.command(name=name)(cmd)


_lifecycle("pause", "Freeze every process of a sandbox in place.")
_lifecycle("unpause", "Thaw a paused sandbox.")
_lifecycle("stop", "End every process; keep the filesystem (no CPU or memory used).")
_lifecycle("resume", "Start a stopped sandbox again over its kept filesystem.")
_lifecycle("destroy", "Remove a sandbox and everything it made.")


@app.command()
def snapshot(
    sandbox_id: SandboxId,
    name: Annotated[str | None, typer.Option(help="A name to restore it by.")] = None,
    json: Json = False,
) -> None:
    """Seal the sandbox's filesystem as a snapshot (consistent while running)."""
    snap = _connect(sandbox_id).snapshot(name)
    if json:
        emit_json(snap.to_json())
    else:
        console.print(snap.id)


@app.command()
def snapshots(sandbox_id: SandboxId, json: Json = False) -> None:
    """List a sandbox's snapshots."""
    from rich.table import Table

    snaps = _connect(sandbox_id).snapshots()
    if json:
        emit_json([s.to_json() for s in snaps])
        return
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "NAME", "PARENT", "CREATED"):
        t.add_column(col)
    for s in snaps:
        t.add_row(s.id, s.name or "", s.parent_id or "", s.created_at.isoformat()[:19])
    console.print(t)


@app.command()
def restore(
    sandbox_id: SandboxId,
    snapshot: Annotated[str, typer.Argument(help="Snapshot id or name.")],
    json: Json = False,
) -> None:
    """Put a sandbox's filesystem back to a snapshot."""
    sbx = _connect(sandbox_id)
    sbx.restore(snapshot)
    if json:
        emit_json({"id": sbx.id, "state": sbx.state.value, "snapshot": snapshot})
    else:
        console.print(f"{sbx.id} restored to {snapshot}")


@app.command()
def fork(
    snapshot: Annotated[str, typer.Argument(help="Snapshot id or name.")],
    count: Annotated[int, typer.Option(help="How many sandboxes to make.")] = 1,
    meta: Annotated[list[str] | None, typer.Option(help="Metadata KEY=VALUE (repeatable).")
                    ] = None,
    json: Json = False,
) -> None:
    """New running sandboxes from a snapshot (copy-on-write)."""
    from corral.compute import Sandbox

    boxes = Sandbox.fork(snapshot, count=count, metadata=parse_kv(meta, "--meta"))
    if json:
        emit_json({"ids": [b.id for b in boxes]})
    else:
        for b in boxes:
            console.print(b.id)


@app.command(name="rm-snapshot")
def rm_snapshot(
    snapshot: Annotated[str, typer.Argument(help="Snapshot id or name.")],
    json: Json = False,
) -> None:
    """Delete a snapshot that nothing depends on."""
    from corral.compute import Sandbox

    Sandbox.delete_snapshot(snapshot)
    if json:
        emit_json({"deleted": snapshot})
    else:
        console.print(f"deleted {snapshot}")
