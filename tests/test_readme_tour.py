"""The README's 5-minute tour runs as written (the ```bash block after its heading)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A 5-minute tour", 1)[1]
    m = re.search(r"```bash\n(.*?)```", section, re.S)
    assert m, "the tour has no ```bash block"
    return m.group(1)


def test_readme_tour_runs_as_written(corral_home: Path) -> None:
    script = "set -euo pipefail\nset -x\n" + tour_script()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "example.com is not part of this project" in out  # the 403's reason
    assert "case.py" in out  # restored after `rm -rf textkit`
    assert "same result in the sandbox and on the host" in out
