"""Where corral keeps its state, and the knobs read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Sandbox commands run as this host uid/gid by default (no host account uses it).
DEFAULT_SANDBOX_UID = 61000


def default_home() -> Path:
    """``$CORRAL_HOME``, else ``/var/lib/corral`` as root, else ``~/.local/share/corral``."""
    env = os.environ.get("CORRAL_HOME")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    return Path.home() / ".local" / "share" / "corral"


@dataclass(frozen=True)
class Settings:
    """Resolved settings of one corral installation (one state dir)."""

    home: Path
    sandbox_uid: int = DEFAULT_SANDBOX_UID
    storage: str = "auto"  # auto | btrfs | copy
    storage_size: str = "200G"  # sparse size of the btrfs pool file

    @classmethod
    def from_env(cls, home: Path | None = None) -> Settings:
        return cls(
            home=(home or default_home()),
            sandbox_uid=int(os.environ.get("CORRAL_SANDBOX_UID", DEFAULT_SANDBOX_UID)),
            storage=os.environ.get("CORRAL_STORAGE", "auto"),
            storage_size=os.environ.get("CORRAL_STORAGE_SIZE", "200G"),
        )

    @property
    def db_path(self) -> Path:
        return self.home / "corral.db"

    @property
    def db_url(self) -> str:
        return os.environ.get("CORRAL_DB_URL") or f"sqlite:///{self.db_path}"
