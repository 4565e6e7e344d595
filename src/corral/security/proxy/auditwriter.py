"""The proxy daemon's audit writer: a child process that appends the records the
daemon sends it (one JSON object per line on stdin) to the installation's
hash-chained audit log, so the daemon's event loop never waits on the log.

Whatever has arrived is appended as one batch (``AuditLog.append_many``: one
lock, one write, one head update), so a burst of requests costs the file work
once. It ends when its stdin closes (the daemon stopped, or died).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from corral.security.audit import AuditLog, Entry

log = logging.getLogger("corral.security.proxy")

#: bytes read from the pipe at most per batch
READ_SIZE = 1 << 20


def parse(line: bytes) -> Entry | None:
    """One line from the daemon -> an entry (None, and logged, when unreadable)."""
    try:
        rec = json.loads(line)
        return Entry(str(rec["event"]), sandbox=rec.get("sandbox"), task=rec.get("task"),
                     actor=rec.get("actor") or "proxy", details=rec.get("details") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("audit record not readable: %s", exc)
        return None


def main(argv: list[str]) -> None:
    audit = AuditLog(argv[0])
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        chunk = os.read(fd, READ_SIZE)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        _write(audit, lines)
    _write(audit, [pending])


def _write(audit: AuditLog, lines: list[bytes]) -> None:
    entries = [e for e in (parse(ln) for ln in lines if ln.strip()) if e is not None]
    try:
        audit.append_many(entries)
    except (OSError, ValueError, TypeError) as exc:
        log.error("%d audit records not written: %s", len(entries), exc)


if __name__ == "__main__":
    main(sys.argv[1:])
