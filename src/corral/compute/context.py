"""One installation's settings, store and locks, shared by every handle in a process."""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.settings import Settings
from corral.store import Store, open_store

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str, n: int = 10) -> str:
    """A short random id such as ``sb-4k2x9q0mzt`` (Crockford-ish base32)."""
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: Store

    @property
    def home(self) -> Path:
        return self.settings.home

    @contextmanager
    def lock(self, name: str, *, blocking: bool = True) -> Iterator[bool]:
        """An exclusive inter-process lock (flock). Yields False if not blocking and busy."""
        locks = self.home / "locks"
        # not parents=True: a late caller must not bring back a home that was removed
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def drop_lock(self, name: str) -> None:
        try:
            (self.home / "locks" / f"{name}.lock").unlink()
        except FileNotFoundError:
            pass


_contexts: dict[Path, Context] = {}
_contexts_lock = threading.Lock()


def get_context(home: Path | str | None = None) -> Context:
    """The context for ``home`` (default: ``$CORRAL_HOME`` or the platform default).

    Thread safe; the store is opened (and migrated) once per home and process.
    """
    settings = Settings.from_env(Path(home) if home is not None else None)
    ctx = _contexts.get(settings.home)
    if ctx is not None:
        return ctx
    with _contexts_lock:
        ctx = _contexts.get(settings.home)
        if ctx is None:
            settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            ctx = Context(settings=settings, store=open_store(settings.db_url))
            _contexts[settings.home] = ctx
        return ctx
