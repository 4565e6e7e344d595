"""``Sandbox``: the one handle on a sandbox, with namespaced sub-APIs.

    sbx = Sandbox.create(workspace=path, limits=Limits(cpus=1), metadata={"task": "T-12"})
    sbx.commands.run("pytest -q")
    snap = sbx.snapshot("before-risky-fix"); sbx.restore(snap)
    a, b = Sandbox.fork(snap, count=2)

A handle holds only the sandbox id: every call reads the current state from the
store, so handles in different processes stay consistent. Lifecycle calls take
an inter-process lock on the sandbox.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from corral.compute import events, states
from corral.compute.context import Context, get_context, new_id
from corral.compute.provider import Provider, get_provider
from corral.compute.states import SandboxState
from corral.compute.types import Hooks, Limits, SnapshotInfo
from corral.errors import (
    CorralError,
    InvalidState,
    SandboxNotFound,
    SnapshotNotFound,
    UsageError,
)
from corral.store.models import SandboxRow, SnapshotRow, utcnow

log = logging.getLogger("corral.compute")

#: a sandbox stuck in CREATING or DESTROYING this long with its lock free was abandoned
_ABANDONED_AFTER = 2.0
_UNSETTLED = (SandboxState.CREATING.value, SandboxState.DESTROYING.value)


class Sandbox:
    """A handle on one sandbox. Create with ``Sandbox.create``, ``connect``, ``fork``."""

    def __init__(self, sandbox_id: str, ctx: Context) -> None:
        from corral.compute.commands import Commands
        from corral.compute.files import Files
        from corral.compute.pty import PtyApi

        self.id = sandbox_id
        self._ctx = ctx
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = PtyApi(self)

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- construction --------------------------------------------------------
    @classmethod
    def create(
        cls,
        env: str = "default",
        workspace: str | Path | None = None,
        limits: Limits | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        user: str = "agent",
        env_vars: Mapping[str, str] | None = None,
        expose: Sequence[str] = (),
        hooks: Hooks | None = None,
        base: str = "host",
        provider: str = "local",
        home: str | Path | None = None,
    ) -> Sandbox:
        """Create and start a sandbox; returns once it accepts commands.

        ``env`` is ``"default"`` (the host's root filesystem, read-only) or the
        name of an environment built with ``corral env build``, whose prebuild
        the sandbox forks from. ``workspace`` seeds ``/workspace`` (the directory
        is only read). ``expose`` lists host paths mounted read-only at the same
        place (toolchains in home directories such as ``~/.pyenv``).

        Raises ``UsageError`` for bad input and ``SandboxError`` when the machine
        cannot make the sandbox; nothing is left behind in either case.
        """
        ctx = get_context(home)
        if user not in ("agent", "root"):
            raise UsageError(f"user must be 'agent' or 'root', not {user!r}")
        ws = _check_workspace(workspace)
        snapshot: SnapshotRow | None = None
        spec: dict[str, Any] = {"user": user, "env": {}, "expose": [], "base": base}
        if env != "default":
            from corral.compute.environment import prebuild_for

            snapshot = prebuild_for(ctx, env)
            spec = dict(snapshot.spec)
        spec["env"] = {**spec.get("env", {}), **(env_vars or {})}
        spec["expose"] = [*spec.get("expose", []), *(_check_expose(p) for p in expose)]
        spec["user"] = user
        return cls._create(
            ctx, provider=provider, env=env, spec=spec, limits=limits or Limits(),
            metadata=metadata, workspace=ws, snapshot=snapshot, hooks=hooks or Hooks(),
        )

    @classmethod
    def _create(
        cls,
        ctx: Context,
        *,
        provider: str,
        env: str,
        spec: dict[str, Any],
        limits: Limits,
        metadata: Mapping[str, str] | None,
        workspace: Path | None,
        snapshot: SnapshotRow | None,
        hooks: Hooks,
    ) -> Sandbox:
        prov = get_provider(provider, ctx.settings)
        sid = new_id("sb")
        spec = {**spec, "hooks": hooks.to_json()}
        spec["env"] = {**spec.get("env", {}), **hooks.env}
        row = SandboxRow(
            id=sid, state=SandboxState.CREATING.value, provider=provider, env=env,
            meta=dict(metadata or {}), limits=limits.to_json(), spec=spec, runtime={},
            lowers=[], origin_snapshot=snapshot.id if snapshot else None,
            created_at=utcnow(), updated_at=utcnow(),
        )
        with ctx.lock(sid):
            with ctx.store.session() as s:
                s.add(row)
            try:
                prov.create(row, workspace=workspace, snapshot=snapshot, hooks=hooks)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    prov.destroy(row)
                with ctx.store.session() as s:
                    s.execute(update(SandboxRow).where(SandboxRow.id == sid).values(
                        state=SandboxState.DESTROYED.value, error=str(exc)[:2000],
                        updated_at=utcnow()))
                ctx.drop_lock(sid)
                if isinstance(exc, CorralError):
                    exc.sandbox_id = exc.sandbox_id or sid
                raise
            row.state = SandboxState.RUNNING.value
            _save(ctx, row)
        events.emit("sandbox.created", sid, env=env, provider=provider,
                    snapshot=snapshot.id if snapshot else None, metadata=dict(row.meta))
        return cls(sid, ctx)

    @classmethod
    def connect(cls, sandbox_id: str, *, home: str | Path | None = None) -> Sandbox:
        """A handle on an existing sandbox, from any process. Raises ``SandboxNotFound``."""
        ctx = get_context(home)
        sbx = cls(sandbox_id, ctx)
        row = sbx._row()
        if row.state == SandboxState.DESTROYED.value:
            raise SandboxNotFound(f"sandbox {sandbox_id} was destroyed", sandbox_id=sandbox_id)
        sbx.reconcile()
        return sbx

    @classmethod
    def list(
        cls,
        metadata: Mapping[str, str] | None = None,
        *,
        state: SandboxState | str | None = None,
        include_destroyed: bool = False,
        home: str | Path | None = None,
    ) -> builtins.list[Sandbox]:
        """Sandboxes whose metadata contains every given key=value pair, oldest first."""
        ctx = get_context(home)
        with ctx.store.session() as s:
            q = select(SandboxRow).order_by(SandboxRow.created_at)
            if state is not None:
                q = q.where(SandboxRow.state == SandboxState(state).value)
            elif not include_destroyed:
                q = q.where(SandboxRow.state != SandboxState.DESTROYED.value)
            rows = list(s.scalars(q))
        want = dict(metadata or {})
        out = []
        for r in rows:
            if all(r.meta.get(k) == v for k, v in want.items()):
                sbx = cls(r.id, ctx)
                sbx.reconcile(r)
                if (not include_destroyed and state is None and r.state in _UNSETTLED
                        and sbx.state is SandboxState.DESTROYED):
                    continue  # an abandoned create or destroy, just finished off
                out.append(sbx)
        return out

    @classmethod
    def fork(
        cls,
        snapshot: SnapshotInfo | str,
        count: int = 1,
        *,
        metadata: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        hooks: Hooks | None = None,
        home: str | Path | None = None,
    ) -> builtins.list[Sandbox]:
        """``count`` new running sandboxes whose filesystem starts as ``snapshot``.

        Copy-on-write: the cost does not grow with the size of the snapshot.
        If one fork fails, the ones already made are destroyed and the error raised.
        """
        ctx = get_context(home)
        if count < 1:
            raise UsageError(f"fork count must be at least 1, not {count}")
        snap = _find_snapshot(ctx, snapshot if isinstance(snapshot, str) else snapshot.id)
        made: builtins.list[Sandbox] = []
        src_limits = Limits()
        src_meta: dict[str, str] = {}
        provider = "local"
        if snap.sandbox_id:
            with ctx.store.session() as s:
                src = s.get(SandboxRow, snap.sandbox_id)
                if src is not None:
                    src_limits = Limits.from_json(src.limits)
                    src_meta = dict(src.meta)
                    provider = src.provider
        provider = snap.spec.get("provider", provider)
        try:
            for _ in range(count):
                made.append(cls._create(
                    ctx, provider=provider, env=snap.env, spec=dict(snap.spec),
                    limits=limits or src_limits,
                    metadata={**src_meta, **(metadata or {}), "forked_from": snap.id},
                    workspace=None, snapshot=snap, hooks=hooks or Hooks(),
                ))
        except BaseException:
            for sbx in made:
                with contextlib.suppress(Exception):
                    sbx.destroy()
            raise
        return made

    # -- reading -------------------------------------------------------------
    def _row(self) -> SandboxRow:
        with self._ctx.store.session() as s:
            row = s.get(SandboxRow, self.id)
        if row is None:
            raise SandboxNotFound(f"no sandbox with id {self.id!r}", sandbox_id=self.id)
        return row

    @property
    def provider(self) -> Provider:
        return get_provider(self._row().provider, self._ctx.settings)

    @property
    def state(self) -> SandboxState:
        """The current state (read from the store, so other processes' changes show)."""
        return SandboxState(self._row().state)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._row().meta)

    @property
    def limits(self) -> Limits:
        return Limits.from_json(self._row().limits)

    @property
    def netns_path(self) -> Path | None:
        """Path of the sandbox's network namespace; it survives stop and resume."""
        row = self._row()
        return get_provider(row.provider, self._ctx.settings).netns_path(row)

    def info(self) -> dict[str, Any]:
        """Everything worth showing about the sandbox, JSON-ready."""
        row = self._row()
        prov = get_provider(row.provider, self._ctx.settings)
        out: dict[str, Any] = {
            "id": row.id,
            "state": row.state,
            "provider": row.provider,
            "env": row.env,
            "metadata": dict(row.meta),
            "limits": dict(row.limits),
            "user": row.spec.get("user", "agent"),
            "created_at": _aware(row.created_at).isoformat(),
            "origin_snapshot": row.origin_snapshot,
        }
        if row.error:
            out["error"] = row.error
        if row.state in (SandboxState.RUNNING.value, SandboxState.PAUSED.value):
            with contextlib.suppress(Exception):
                out["stats"] = prov.stats(row)
        return out

    def reconcile(self, row: SandboxRow | None = None) -> None:
        """Bring the stored state in line with reality after a crash or reboot.

        A running or paused sandbox whose init is gone becomes stopped; a sandbox
        abandoned half-created or half-destroyed is finished off (destroyed).
        """
        row = row or self._row()
        st = SandboxState(row.state)
        prov = get_provider(row.provider, self._ctx.settings)
        if st in (SandboxState.RUNNING, SandboxState.PAUSED):
            if prov.is_alive(row):
                if st is SandboxState.RUNNING and prov.is_frozen(row):
                    self._thaw_abandoned()
                return
            with self._ctx.lock(self.id):
                row = self._row()
                if row.state not in (SandboxState.RUNNING.value, SandboxState.PAUSED.value):
                    return
                if prov.is_alive(row):
                    return
                with contextlib.suppress(Exception):
                    prov.stop(row)
                row.state = SandboxState.STOPPED.value
                row.error = "its init process ended unexpectedly; the filesystem is kept"
                _save(self._ctx, row)
            events.emit("sandbox.stopped", self.id, reason="init ended unexpectedly")
        elif st in (SandboxState.CREATING, SandboxState.DESTROYING):
            age = (utcnow() - _aware(row.updated_at)).total_seconds()
            if age < _ABANDONED_AFTER:
                return
            with self._ctx.lock(self.id, blocking=False) as got:
                if not got:
                    return  # someone is working on it right now
                row = self._row()
                if row.state in (SandboxState.CREATING.value, SandboxState.DESTROYING.value):
                    self._finish_destroy(row, reason="abandoned by a crashed process")

    def _thaw_abandoned(self) -> None:
        """Thaw a running sandbox left frozen by a snapshot whose process died half-way
        (every exec would block forever joining the frozen cgroup). Under the lock: a
        live snapshot holds it for the few milliseconds it freezes."""
        with self._ctx.lock(self.id):
            row = self._row()
            prov = get_provider(row.provider, self._ctx.settings)
            if row.state != SandboxState.RUNNING.value or not prov.is_frozen(row):
                return
            prov.unpause(row)
        events.emit("sandbox.unpaused", self.id, reason="frozen by an interrupted snapshot")

    # -- lifecycle -----------------------------------------------------------
    @contextlib.contextmanager
    def _op(self, op: str) -> Iterator[SandboxRow]:
        with self._ctx.lock(self.id):
            row = self._row()
            states.check(op, SandboxState(row.state), self.id)
            yield row
            new = states.RESULT[op]
            if new is not None:
                row.state = new.value
            row.error = None if new is not None else row.error
            _save(self._ctx, row)

    def pause(self) -> None:
        """Freeze every process in place (cgroup freezer). Memory is kept."""
        with self._op("pause") as row:
            self._alive_or_stopped(row)
            get_provider(row.provider, self._ctx.settings).pause(row)
        events.emit("sandbox.paused", self.id)

    def unpause(self) -> None:
        """Thaw a paused sandbox; its processes continue where they were."""
        with self._op("unpause") as row:
            get_provider(row.provider, self._ctx.settings).unpause(row)
        events.emit("sandbox.unpaused", self.id)

    def stop(self) -> None:
        """End every process; the filesystem stays. A stopped sandbox uses no CPU or RAM."""
        with self._op("stop") as row:
            get_provider(row.provider, self._ctx.settings).stop(row)
        events.emit("sandbox.stopped", self.id, reason="requested")

    def resume(self) -> None:
        """Start a fresh init over the kept filesystem of a stopped sandbox."""
        with self._op("resume") as row:
            get_provider(row.provider, self._ctx.settings).start(row)
        events.emit("sandbox.resumed", self.id)

    def destroy(self) -> None:
        """Remove the sandbox and everything it made. Destroying twice is an error."""
        with self._ctx.lock(self.id):
            row = self._row()
            states.check("destroy", SandboxState(row.state), self.id)
            self._finish_destroy(row, reason="requested")

    def _finish_destroy(self, row: SandboxRow, *, reason: str) -> None:
        row.state = SandboxState.DESTROYING.value
        _save(self._ctx, row)
        prov = get_provider(row.provider, self._ctx.settings)
        try:
            prov.destroy(row)
        except CorralError as exc:
            exc.sandbox_id = exc.sandbox_id or self.id
            raise
        row.state = SandboxState.DESTROYED.value
        row.runtime = {}
        _save(self._ctx, row)
        self._ctx.drop_lock(self.id)
        events.emit("sandbox.destroyed", self.id, reason=reason)

    def _alive_or_stopped(self, row: SandboxRow) -> None:
        prov = get_provider(row.provider, self._ctx.settings)
        if not prov.is_alive(row):
            with contextlib.suppress(Exception):
                prov.stop(row)
            row.state = SandboxState.STOPPED.value
            row.error = "its init process ended unexpectedly; the filesystem is kept"
            _save(self._ctx, row)
            raise InvalidState(
                f"sandbox {self.id} is no longer running (its init ended); resume it",
                sandbox_id=self.id, state="stopped",
            )

    def ensure_running(self) -> SandboxRow:
        """The row, after checking the sandbox really runs (used by commands and pty)."""
        row = self._row()
        states.check("exec", SandboxState(row.state), self.id)
        if not get_provider(row.provider, self._ctx.settings).is_alive(row):
            with self._ctx.lock(self.id):
                row = self._row()
                states.check("exec", SandboxState(row.state), self.id)
                self._alive_or_stopped(row)
        return row

    # -- snapshots -----------------------------------------------------------
    def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Seal the current filesystem as a snapshot (consistent while running:
        the sandbox is frozen for the few milliseconds it takes)."""
        if name is not None:
            _check_snapshot_name(name)
        with self._op("snapshot") as row:
            prov = get_provider(row.provider, self._ctx.settings)
            snap_id = new_id("snap")
            sealed = prov.snapshot(row, snap_id)
            spec = {k: v for k, v in row.spec.items() if k != "hooks"}
            spec["provider"] = row.provider
            srow = SnapshotRow(
                id=snap_id, name=name, sandbox_id=row.id, parent_id=row.origin_snapshot,
                kind="user", storage=row.runtime.get("storage", row.provider),
                layer=sealed.layer, lowers=sealed.lowers, env=row.env, spec=spec,
                size_bytes=sealed.size_bytes, created_at=utcnow(),
            )
            with self._ctx.store.session() as s:
                s.add(srow)
        events.emit("sandbox.snapshot", self.id, snapshot=snap_id, name=name)
        return _snap_info(srow)

    def snapshots(self) -> builtins.list[SnapshotInfo]:
        """This sandbox's snapshots, oldest first."""
        self._row()
        with self._ctx.store.session() as s:
            rows = s.scalars(
                select(SnapshotRow).where(SnapshotRow.sandbox_id == self.id)
                .order_by(SnapshotRow.created_at)
            )
            return [_snap_info(r) for r in rows]

    def restore(self, snapshot: SnapshotInfo | str) -> None:
        """Put the filesystem back to ``snapshot`` (an id, a name, or a SnapshotInfo).

        Running processes end and a fresh init starts over the restored files;
        a stopped sandbox stays stopped.
        """
        ref = snapshot if isinstance(snapshot, str) else snapshot.id
        snap = _find_snapshot(self._ctx, ref, sandbox_id=self.id)
        with self._op("restore") as row:
            prov = get_provider(row.provider, self._ctx.settings)
            was = SandboxState(row.state)
            if was is not SandboxState.STOPPED:
                prov.stop(row)
            prov.restore(row, snap)
            row.origin_snapshot = snap.id
            if was is not SandboxState.STOPPED:
                prov.start(row)
                row.state = SandboxState.RUNNING.value
        events.emit("sandbox.restored", self.id, snapshot=snap.id)

    @staticmethod
    def delete_snapshot(snapshot: SnapshotInfo | str, *, home: str | Path | None = None) -> None:
        """Delete a snapshot nothing depends on (no sandbox or snapshot built on it,
        no environment using it as its prebuild)."""
        ctx = get_context(home)
        snap = _find_snapshot(ctx, snapshot if isinstance(snapshot, str) else snapshot.id)
        from corral.store.models import EnvironmentRow

        with ctx.lock("snapshots"):
            with ctx.store.session() as s:
                users = [
                    r.id for r in s.scalars(select(SandboxRow).where(
                        SandboxRow.state != SandboxState.DESTROYED.value))
                    if any(snap.layer in lw for lw in r.lowers)
                ]
                users += [
                    r.id for r in s.scalars(select(SnapshotRow))
                    if any(snap.layer in lw for lw in r.lowers)
                ]
                envs = [e.name for e in s.scalars(
                    select(EnvironmentRow).where(EnvironmentRow.snapshot_id == snap.id))]
            if users or envs:
                what = ", ".join(users + [f"environment {e}" for e in envs])
                raise UsageError(f"snapshot {snap.id} is in use by {what}")
            provider = snap.spec.get("provider", "local")
            get_provider(provider, ctx.settings).delete_snapshot(snap)
            with ctx.store.session() as s:
                obj = s.get(SnapshotRow, snap.id)
                if obj is not None:
                    s.delete(obj)


def _save(ctx: Context, row: SandboxRow) -> None:
    with ctx.store.session() as s:
        s.execute(update(SandboxRow).where(SandboxRow.id == row.id).values(
            state=row.state, runtime=dict(row.runtime), lowers=list(row.lowers),
            origin_snapshot=row.origin_snapshot, error=row.error, updated_at=utcnow(),
        ))


def _aware(ts: Any) -> Any:
    import datetime as dt

    if ts.tzinfo is None:
        return ts.replace(tzinfo=dt.UTC)
    return ts


def _snap_info(r: SnapshotRow) -> SnapshotInfo:
    return SnapshotInfo(
        id=r.id, name=r.name, sandbox_id=r.sandbox_id, parent_id=r.parent_id, kind=r.kind,
        storage=r.storage, size_bytes=r.size_bytes, created_at=_aware(r.created_at),
    )


def _find_snapshot(ctx: Context, ref: str, *, sandbox_id: str | None = None) -> SnapshotRow:
    """A snapshot by id, or by name (preferring the given sandbox's own)."""
    with ctx.store.session() as s:
        row = s.get(SnapshotRow, ref)
        if row is not None:
            return row
        named = list(s.scalars(
            select(SnapshotRow).where(SnapshotRow.name == ref).order_by(SnapshotRow.created_at)))
    if sandbox_id is not None:
        own = [r for r in named if r.sandbox_id == sandbox_id]
        if own:
            return own[-1]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(r.id for r in named)
        raise UsageError(f"snapshot name {ref!r} is ambiguous ({ids}); use an id")
    where = f" of sandbox {sandbox_id}" if sandbox_id else ""
    raise SnapshotNotFound(f"no snapshot{where} with id or name {ref!r}", sandbox_id=sandbox_id)


def _check_snapshot_name(name: str) -> None:
    if not name or len(name) > 128 or name.startswith("snap-") or "/" in name:
        raise UsageError(
            f"bad snapshot name {name!r}: 1-128 characters, no '/', not starting with 'snap-'")


def _check_workspace(workspace: str | Path | None) -> Path | None:
    if workspace is None:
        return None
    ws = Path(workspace).expanduser()
    if not ws.exists():
        raise UsageError(f"workspace directory {ws} does not exist")
    if not ws.is_dir():
        raise UsageError(f"workspace {ws} is not a directory")
    return ws.resolve()


def _check_expose(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise UsageError(f"exposed path {path!r} must be absolute (or start with ~)")
    if not p.exists():
        raise UsageError(f"exposed path {p} does not exist on the host")
    return str(p.resolve())


__all__ = ["Sandbox"]
