"""The store: a new installation opened by many processes at once migrates once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_concurrent_first_open_of_a_new_installation(tmp_path: Path) -> None:
    code = (
        "import sys, threading\n"
        "from corral.compute.context import get_context\n"
        "errs = []\n"
        "def go():\n"
        "    try:\n"
        "        get_context(sys.argv[1]).store\n"
        "    except Exception as e:\n"
        "        errs.append(e)\n"
        "ts = [threading.Thread(target=go) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(repr(errs))\n"
        "sys.exit(1 if errs else 0)\n"
    )
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(home)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(6)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        from corral.store import HEAD_REVISION, open_store

        store = open_store(f"sqlite:///{home / 'corral.db'}")
        assert store._current_revision() == HEAD_REVISION


def test_a_first_open_killed_mid_migration_leaves_nothing_half_done(tmp_path: Path) -> None:
    """kill -9 while a new installation's tables are being made: the next process
    finds an empty store, not one stuck between two revisions."""
    code = (
        "import os, sys\n"
        "from sqlalchemy import event\n"
        "from sqlalchemy.engine import Engine\n"
        "made = []\n"
        "@event.listens_for(Engine, 'before_cursor_execute')\n"
        "def die(conn, cursor, statement, *a):\n"
        "    if statement.lstrip().upper().startswith('CREATE TABLE'):\n"
        "        made.append(statement)\n"
        "        if len(made) == int(sys.argv[2]):\n"
        "            os.kill(os.getpid(), 9)\n"
        "from corral.store import open_store\n"
        "open_store(sys.argv[1])\n"
    )
    from corral.store import HEAD_REVISION, open_store

    # the 5th table belongs to the second migration, after the first one's three
    for nth in (2, 5, 9):
        url = f"sqlite:///{tmp_path / f'corral-{nth}.db'}"
        p = subprocess.run([sys.executable, "-c", code, url, str(nth)], capture_output=True,
                           text=True, timeout=120, check=False)
        assert p.returncode == -9, p.stderr
        store = open_store(url)
        assert store._current_revision() == HEAD_REVISION
        from corral.store.models import SandboxRow

        with store.session() as s:
            assert s.query(SandboxRow).count() == 0


def test_a_store_of_an_older_revision_is_upgraded_with_its_rows(tmp_path: Path) -> None:
    """A store left by an earlier corral (one revision behind) opens at the head, in
    place, with what it held."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from corral.store import HEAD_REVISION, MIGRATIONS, open_store

    url = f"sqlite:///{tmp_path / 'corral.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    previous = f"{int(HEAD_REVISION) - 1:04d}"
    command.upgrade(cfg, previous)
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text(
            "INSERT INTO environments (name, key, snapshot_id, repo, config, built_at, "
            "build_seconds) VALUES ('old', 'k1', 'snap-1', '/r', '{}', "
            "'2026-01-01 00:00:00', 3)"))
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == previous
    engine.dispose()
    store = open_store(url)
    assert store._current_revision() == HEAD_REVISION
    with store.engine.connect() as c:
        assert c.execute(text("SELECT name FROM environments")).scalars().all() == ["old"]
