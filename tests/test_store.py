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
