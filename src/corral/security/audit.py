"""The audit log: one append-only, hash-chained JSONL file per installation.

    log = AuditLog.for_home()                     # $CORRAL_HOME/audit.jsonl
    log.append("request.denied", sandbox="sb-1", task="T-1", actor="proxy",
               details={"method": "GET", "url": "https://x.test/", "reason": "..."})
    log.verify()                                  # VerifyResult(ok, records, broken_seq, ...)

Each line is a record ``{seq, time, sandbox, task, actor, event, details,
prev_hash, hash}``; ``hash`` is the SHA-256 of the canonical JSON (sorted keys,
no spaces) of the record without ``hash``, and ``prev_hash`` is the previous
record's hash (64 zeros for the first). Appenders in several processes take an
exclusive ``flock`` on the file, so seq and chain stay consistent. A small head
file (``audit.jsonl.head``) holds the last seq and hash, so ``verify`` also
notices records cut off the end. Redactors (``add_redactor``) run over every
string in ``details`` before it is written: secret values never reach the log.

The log rotates: once the file passes ``max_bytes`` (64 MiB; the environment's
``CORRAL_AUDIT_MAX_BYTES``), the next append first renames it to a sealed
segment named after its last seq (``audit.jsonl.000000012345``) and starts a new
file whose first record chains onto that one. Reading and ``verify`` walk the
segments in order, then the live file: one chain. Segments are never deleted by
corral; ``verify`` needs all of them (a missing one shows as deleted records).
Appenders lock the live file and check, once they hold the lock, that it is
still the one at ``path`` (a rotation in between sends them to the new one).

Event names (details in docs/policy.md): sandbox.*, command.run, request.allowed,
request.denied, request.held, approval.requested / approved / denied / timeout,
secret.injected, secret.exfiltration_blocked, policy.reloaded, policy.rejected,
llm.usage, llm.limit_refused.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_str
from pathlib import Path
from typing import Any

from corral.security.types import AuditRecord

__all__ = ["GENESIS", "AuditLog", "Entry", "VerifyResult", "default_actor", "install_audit",
           "record_hash"]

GENESIS = "0" * 64
#: size past which the log rotates (``CORRAL_AUDIT_MAX_BYTES`` overrides it)
MAX_BYTES = 64 * 1024 * 1024
#: a sealed segment's suffix: its last seq, zero-padded so names sort in order
_SEGMENT_DIGITS = 12
_FIELDS = ("seq", "time", "sandbox", "task", "actor", "event", "details", "prev_hash")
Redactor = Callable[[str], str]


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _encode(value: Any) -> str:
    """``value`` as canonical JSON (what ``_canonical`` makes of it, as text)."""
    kind = type(value)
    if kind is str:  # the common case, without json.dumps's per-call setup
        return _encode_str(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


#: the record's keys in canonical (sorted) order, without and with "hash"
_BODY_KEYS = sorted(("seq", "time", "sandbox", "task", "actor", "event", "details",
                     "prev_hash"))
_LINE_KEYS = sorted((*_BODY_KEYS, "hash"))


def _hash_and_line(fields: dict[str, Any], details: str) -> tuple[str, bytes]:
    """(hash, the record's line) for ``fields`` (no ``hash`` yet), with ``details``
    already encoded: each value is encoded once, and both the hashed body and the
    line are exactly ``_canonical`` of the record (sorted keys, no spaces)."""
    parts = {k: details if k == "details" else _encode(fields[k]) for k in _BODY_KEYS}
    body = "{" + ",".join(f'"{k}":{parts[k]}' for k in _BODY_KEYS) + "}"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    parts["hash"] = f'"{digest}"'
    line = "{" + ",".join(f'"{k}":{parts[k]}' for k in _LINE_KEYS) + "}\n"
    return digest, line.encode("utf-8")


def record_hash(fields: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a record without its ``hash``."""
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def default_actor() -> str:
    """``user:<login>`` for commands a person runs."""
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class Entry:
    """One record to append (``AuditLog.append_many``)."""

    event: str
    sandbox: str | None = None
    task: str | None = None
    actor: str = "corral"
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    #: seq of the first broken record (or the line number when no seq can be read)
    broken_seq: int | None = None
    line: int | None = None
    message: str = ""
    #: the file holding the broken record (the live log or a sealed segment)
    file: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.records} records, chain intact"
        return self.message


class AuditLog:
    """Appends to and reads one audit log. Safe across threads and processes."""

    def __init__(self, path: str | Path, *, fsync: bool = False,
                 max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._fsync = fsync
        if max_bytes is None:
            env = os.environ.get("CORRAL_AUDIT_MAX_BYTES")
            max_bytes = int(env) if env and env.isdigit() else MAX_BYTES
        self.max_bytes = max(max_bytes, 1)
        self._lock = threading.Lock()
        # replaced, never mutated: a writer in another thread iterates a stable tuple
        self._redactors: tuple[Redactor, ...] = ()
        # (inode, size) of the file after our last append, with its last seq and hash
        self._tail: tuple[int, int, int, str] | None = None

    @classmethod
    def for_home(cls, home: str | Path | None = None) -> AuditLog:
        """The log of an installation (default ``$CORRAL_HOME``)."""
        from corral.settings import Settings

        settings = Settings.from_env(Path(home) if home is not None else None)
        return cls(settings.home / "audit.jsonl")

    def add_redactor(self, fn: Redactor) -> None:
        """Run ``fn`` over every string in details before writing (e.g. ``Broker.scrub_text``).

        Safe from any thread, also while another thread appends."""
        with self._lock:
            if fn not in self._redactors:
                self._redactors = (*self._redactors, fn)

    def remove_redactor(self, fn: Redactor) -> None:
        with self._lock:
            self._redactors = tuple(r for r in self._redactors if r != fn)

    def _redact(self, value: Any, fns: tuple[Redactor, ...] | None = None) -> Any:
        if fns is None:
            fns = self._redactors
        if isinstance(value, str):
            for fn in fns:
                value = fn(value)
            return value
        if isinstance(value, dict):
            return {str(k): self._redact(v, fns) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact(v, fns) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        return self._redact(str(value), fns)

    # -- writing ---------------------------------------------------------------

    def append(self, event: str, *, sandbox: str | None = None, task: str | None = None,
               actor: str = "corral", details: dict[str, Any] | None = None) -> AuditRecord:
        """Append one record and return it. Blocks briefly on the file lock."""
        return self.append_many([Entry(event, sandbox, task, actor, details)])[0]

    def append_many(self, entries: Sequence[Entry]) -> list[AuditRecord]:
        """Append several records in one go (one lock, one write, one head update) and
        return them, in order. What a busy writer such as the proxy's uses: the file
        work is paid once per batch instead of once per record."""
        if not entries:
            return []
        fns = self._redactors
        clean: list[tuple[dict[str, Any], str]] = []
        for e in entries:
            details = e.details or {}
            if fns:
                details = self._redact(details, fns)
            try:
                encoded = _encode(details)
            except (TypeError, ValueError):  # a Path, a NaN...: made JSON the slow way
                details = self._redact(details, fns)
                encoded = _encode(details)
            clean.append((details, encoded))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        out: list[AuditRecord] = []
        with self._lock:
            fd, st = self._open_locked()
            try:
                if self._tail and self._tail[:2] == (st.st_ino, st.st_size):
                    seq, prev, partial = self._tail[2], self._tail[3], False
                else:
                    seq, prev, partial = _read_tail(fd, st.st_size)
                if st.st_size >= self.max_bytes and seq > 0:
                    self._seal(seq)  # we hold the lock: nobody appends meanwhile
                    os.close(fd)
                    fd = -1  # never closed twice (another thread may reuse the number)
                    fd, st = self._open_locked()
                    seq, prev, partial = _read_tail(fd, st.st_size)
                if st.st_size == 0:  # a new live file chains onto the last segment
                    seq, prev = self._segment_tail()
                now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
                # a crashed writer left half a line: end it, keep the chain
                lines = [b"\n"] if partial else []
                for e, (details, encoded) in zip(entries, clean, strict=True):
                    seq += 1
                    fields: dict[str, Any] = {
                        "seq": seq, "time": now, "sandbox": e.sandbox, "task": e.task,
                        "actor": e.actor, "event": e.event, "details": details,
                        "prev_hash": prev,
                    }
                    digest, line = _hash_and_line(fields, encoded)
                    fields["hash"] = prev = digest
                    lines.append(line)
                    out.append(AuditRecord(**fields))
                data = b"".join(lines)
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
                self._write_head(seq, prev)
                self._tail = (st.st_ino, st.st_size + len(data), seq, prev)
            finally:
                if fd >= 0:
                    os.close(fd)
        return out

    def _open_locked(self) -> tuple[int, os.stat_result]:
        """The live file, open and locked, and its stat. After the lock is taken it
        must still be the file at ``path``: a rotation may have sealed it meanwhile."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                    return fd, st
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # sealed under us: the next open finds the new live file

    def _seal(self, last_seq: int) -> None:
        """Rename the live file (locked by us) to its segment name, read-only."""
        dest = self.path.with_name(f"{self.path.name}.{last_seq:0{_SEGMENT_DIGITS}d}")
        os.chmod(self.path, 0o400)
        os.rename(self.path, dest)
        self._tail = None

    def segments(self) -> list[Path]:
        """The sealed segments, oldest first."""
        prefix = self.path.name + "."
        found = [p for p in self.path.parent.glob(prefix + "*")
                 if len(p.name) == len(prefix) + _SEGMENT_DIGITS
                 and p.name[len(prefix):].isdigit()]
        return sorted(found)

    def _segment_tail(self) -> tuple[int, str]:
        """The last seq and hash of the newest segment (0 and GENESIS: none)."""
        segs = self.segments()
        if not segs:
            return 0, GENESIS
        fd = os.open(segs[-1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            seq, digest, _ = _read_tail(fd, os.fstat(fd).st_size)
            return seq, digest
        finally:
            os.close(fd)

    def _write_head(self, seq: int, digest: str) -> None:
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            data = f"{seq} {digest}\n".encode()
            os.pwrite(fd, data.ljust(96), 0)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------

    def records(self) -> Iterator[AuditRecord]:
        """Every well-formed record, oldest first (broken lines are skipped)."""
        for _, _, rec, _ in self._lines():
            if rec is not None:
                yield rec

    def tail(self, n: int = 20, *, sandbox: str | None = None) -> list[AuditRecord]:
        """The last ``n`` records (of one sandbox, when given)."""
        if n <= 0:
            return []
        out: list[AuditRecord] = []
        for f in reversed([*self.segments(), self.path]):  # newest first, enough is enough
            got = [r for _, rec, _ in _file_lines(f) if (r := rec) is not None
                   and (sandbox is None or r.sandbox == sandbox)]
            out = got + out
            if len(out) >= n:
                break
        return out[-n:]

    def follow(self, *, sandbox: str | None = None, poll: float = 0.25,
               start_at_end: bool = True) -> Iterator[AuditRecord]:
        """New records as they are appended (blocks; for ``audit tail --follow``)."""
        import time

        f = None
        pending = b""
        last = 0  # the seq of the last record read (whatever the filter)
        try:
            while True:
                if f is None:
                    try:
                        f = open(self.path, "rb")  # noqa: SIM115 - kept across polls
                    except FileNotFoundError:
                        time.sleep(poll)
                        continue
                    if start_at_end:
                        f.seek(0, os.SEEK_END)
                        start_at_end = False
                chunk = f.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        rec = _parse(raw)
                        if rec is None or (last and rec.seq <= last):
                            continue
                        if last and rec.seq > last + 1 and self._sealed_since(last):
                            # rotated more than once while we slept: the segments
                            # in between come first, then this file from its start
                            f.close()
                            f, pending = None, b""
                            for older in self._sealed_since(last):
                                for _, srec, _ in _file_lines(older):
                                    if srec is not None and srec.seq > last:
                                        last = srec.seq
                                        if sandbox is None or srec.sandbox == sandbox:
                                            yield srec
                            break
                        last = rec.seq
                        if sandbox is None or rec.sandbox == sandbox:
                            yield rec
                    continue
                try:
                    rotated = os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    rotated = False
                if rotated:  # ours is sealed and read to its end: on to what came next
                    f.close()
                    f, pending = None, b""
                    continue
                time.sleep(poll)
        finally:
            if f is not None:
                f.close()

    def _sealed_since(self, seq: int) -> list[Path]:
        """The segments holding records after ``seq``, oldest first."""
        return [p for p in self.segments() if int(p.name.rsplit(".", 1)[1]) > seq]

    def _lines(self) -> Iterator[tuple[Path, int, AuditRecord | None, str]]:
        """(file, line number, record or None, problem): the segments, then the live log."""
        for f in [*self.segments(), self.path]:
            for lineno, rec, problem in _file_lines(f):
                yield f, lineno, rec, problem

    def verify(self) -> VerifyResult:
        """Check the whole chain; name the first broken record."""
        prev_seq, prev_hash, count = 0, GENESIS, 0
        for f, lineno, rec, problem in self._lines():
            where = self._where(f, lineno)
            if rec is None:
                seq = _seq_of(lineno, f)
                what = f"record {seq}" if seq is not None else f"line {lineno}"
                return VerifyResult(False, count, seq, lineno,
                                    f"{what} ({where}) is broken: {problem}", file=f.name)
            fields = {k: getattr(rec, k) for k in (*_FIELDS, "hash")}
            if record_hash(fields) != rec.hash:
                return self._bad(rec, f, lineno, count, "its content does not match its hash "
                                 "(edited)")
            if rec.seq != prev_seq + 1:
                kind = ("deleted" if rec.seq > prev_seq + 1 else "reordered or duplicated")
                return self._bad(rec, f, lineno, count, f"expected seq {prev_seq + 1}, found "
                                 f"{rec.seq} (records {kind})")
            if rec.prev_hash != prev_hash:
                return self._bad(rec, f, lineno, count, "prev_hash does not match the record "
                                 "before it (records deleted, reordered or replaced)")
            prev_seq, prev_hash, count = rec.seq, rec.hash, count + 1
        head = self._read_head()
        if head is not None:
            hseq, hhash = head
            if hseq > prev_seq:
                return VerifyResult(False, count, prev_seq + 1, None,
                                    f"record {prev_seq + 1} is missing: the log ends at seq "
                                    f"{prev_seq} but {hseq} records were written "
                                    "(records deleted from the end)")
            if hseq == prev_seq and hhash != prev_hash:
                return VerifyResult(False, count, prev_seq, None,
                                    f"record {prev_seq} is not the one last written "
                                    "(its hash differs from the head file)")
        return VerifyResult(True, count)

    def _where(self, f: Path, lineno: int) -> str:
        return f"line {lineno}" if f == self.path else f"{f.name} line {lineno}"

    def _bad(self, rec: AuditRecord, f: Path, lineno: int, count: int,
             why: str) -> VerifyResult:
        return VerifyResult(False, count, rec.seq, lineno,
                            f"record {rec.seq} ({self._where(f, lineno)}) is broken: {why}",
                            file=f.name)

    def _read_head(self) -> tuple[int, str] | None:
        try:
            text = self.head_path.read_text().split()
            return int(text[0]), text[1]
        except (OSError, ValueError, IndexError):
            return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _file_lines(path: Path) -> Iterator[tuple[int, AuditRecord | None, str]]:
    """(line number, record or None, problem) for every line of one file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    last = lines.pop()
    for i, raw in enumerate(lines, 1):
        rec = _parse(raw)
        yield i, rec, "" if rec else "not a valid record"
    if last:
        yield len(lines) + 1, None, "truncated in the middle of a line"


def _parse(raw: bytes) -> AuditRecord | None:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or set(obj) != {*_FIELDS, "hash"}:
            return None
        if not isinstance(obj["seq"], int) or not isinstance(obj["details"], dict):
            return None
        return AuditRecord(**obj)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


def _seq_of(lineno: int, path: Path) -> int | None:
    """Best effort: the seq a broken line claims to have."""
    import re

    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                if i == lineno:
                    m = re.search(rb'"seq":\s*(\d+)', raw)
                    return int(m.group(1)) if m else None
    except OSError:
        return None
    return None


def _read_tail(fd: int, size: int) -> tuple[int, str, bool]:
    """(last seq, last hash, file ends mid-line), reading backwards from the end."""
    if size == 0:
        return 0, GENESIS, False
    partial = os.pread(fd, 1, size - 1) != b"\n"
    block, end, data = 4096, size, b""
    while True:
        start = max(0, end - block)
        data = os.pread(fd, end - start, start) + data
        end = start
        lines = data.split(b"\n")
        # the first piece may be cut unless we reached the start; the last piece is
        # either empty (after the final newline) or a partial line
        candidates = (lines[1:] if start > 0 else lines)[:-1]
        for raw in reversed(candidates):
            rec = _parse(raw) if raw else None
            if rec is not None:
                return rec.seq, rec.hash, partial
        if start == 0:
            return 0, GENESIS, partial
        block *= 2


def install_audit(home: str | Path | None = None, *, actor: str | None = None) -> AuditLog:
    """Record compute lifecycle events (sandbox.created, .stopped, ...) in ``home``'s log.

    Idempotent per process and home; the CLI calls it at start."""
    from corral.compute import events

    log = AuditLog.for_home(home)
    key = str(log.path)
    if key in _installed:
        return _installed[key][0]
    who = actor or default_actor()

    def listener(event: str, sandbox_id: str, details: dict[str, Any]) -> None:
        meta = details.get("metadata") or {}
        task = meta.get("task") if isinstance(meta, dict) else None
        log.append(event, sandbox=sandbox_id, task=task if isinstance(task, str) else None,
                   actor=who, details=details)

    events.add_listener(listener)
    _installed[key] = (log, listener)
    return log


_installed: dict[str, tuple[AuditLog, Callable[[str, str, dict[str, Any]], None]]] = {}


def uninstall_audit(home: str | Path | None = None) -> None:
    """Undo ``install_audit`` (tests)."""
    from corral.compute import events

    log = AuditLog.for_home(home)
    entry = _installed.pop(str(log.path), None)
    if entry is not None:
        events.remove_listener(entry[1])
