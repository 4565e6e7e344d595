"""corral on PostgreSQL (``CORRAL_DB_URL``) instead of its SQLite default.

A private PostgreSQL server is started for this module: its own cluster in a
temporary directory, run as the ``postgres`` user, listening on a unix socket
only (no TCP at all). Each test gets a fresh database and a fresh corral
installation pointed at it, and drives it through real processes: the store's
first migration from several processes at once, sandboxes made by one process
and driven by the CLI from others, the main job, and the proxy's meter.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: the newest Debian-packaged one, else on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return str(found[-1])
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"PostgreSQL's {name} is missing: install the postgresql package "
                    "(make test does)")
    return on_path


def _as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Path]:
    """The socket directory of a private PostgreSQL server, stopped at the end."""
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("no postgres user: install the postgresql package (make test does)")
    where = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    os.chown(where, pw.pw_uid, pw.pw_gid)
    data = where / "data"
    r = _as_postgres(_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                     "--no-sync", "-E", "UTF8")
    assert r.returncode == 0, r.stderr
    r = _as_postgres(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(where / "log"), "-w",
                     "-o", f"-c listen_addresses='' -k {where} -c fsync=off", "start")
    assert r.returncode == 0, r.stderr + (where / "log").read_text()
    try:
        yield where
    finally:
        _as_postgres(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: Path) -> str:
    """A fresh, empty database on the module's server."""
    import psycopg

    name = f"corral_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=str(pg_server), user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@/{name}?host={pg_server}"


@pytest.fixture
def pg_home(pg_url: str, release_home: Callable[[Path], None]) -> Iterator[Path]:
    """A fresh corral installation whose store is ``pg_url`` (for this process and the
    processes it starts); everything in it is destroyed at the end."""
    home = Path(tempfile.mkdtemp(prefix="corral-test-pg-"))
    old = {k: os.environ.get(k) for k in ("CORRAL_HOME", "CORRAL_DB_URL")}
    os.environ["CORRAL_HOME"], os.environ["CORRAL_DB_URL"] = str(home), pg_url
    try:
        yield home
    finally:
        release_home(home)  # while CORRAL_DB_URL still names the store
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def corral(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CORRAL, *args], capture_output=True, text=True, timeout=300,
                       check=False)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def test_a_new_postgres_store_opened_by_many_processes_at_once(pg_url: str) -> None:
    code = ("import sys\nfrom corral.store import open_store\n"
            "print(open_store(sys.argv[1])._current_revision())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(5)]
    from corral.store import HEAD_REVISION

    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == HEAD_REVISION


def test_sandboxes_made_here_are_driven_from_other_processes(pg_home: Path) -> None:
    from corral.compute import Sandbox

    sbx = Sandbox.create(metadata={"db": "pg"})
    sbx.files.write("/workspace/note.txt", b"on postgres\n")
    r = corral("sandbox", "exec", sbx.id, "--", "cat", "/workspace/note.txt")
    assert r.stdout == "on postgres\n"
    snap = json.loads(corral("sandbox", "snapshot", sbx.id, "--name", "one", "--json").stdout)
    sbx.files.write("/workspace/note.txt", b"changed\n")
    corral("sandbox", "restore", sbx.id, "one")
    assert sbx.files.read("/workspace/note.txt") == b"on postgres\n"
    ids = json.loads(corral("sandbox", "fork", snap["id"], "--count", "2", "--json").stdout)["ids"]
    listed = {s["id"] for s in json.loads(corral("sandbox", "ls", "--meta", "db=pg",
                                                  "--json").stdout)}
    assert listed == {sbx.id, *ids}  # forks keep their origin's metadata
    for sid in ids:
        assert Sandbox.connect(sid).files.read("/workspace/note.txt") == b"on postgres\n"
        corral("sandbox", "destroy", sid)
    bad = corral("sandbox", "destroy", ids[0], check=False)
    assert bad.returncode != 0 and ids[0] in bad.stderr
    sbx.destroy()
    assert Sandbox.list() == []
    assert not (pg_home / "corral.db").exists()  # the state was in PostgreSQL all along


def test_the_main_job_on_postgres(pg_home: Path) -> None:
    out = json.loads(corral("demo", "--json").stdout)
    assert out["merged"] == 7 and out["ci_failures"] >= 1 and out["conflicts"] >= 1
    status = json.loads(corral("status", out["run"], "--json").stdout)
    assert [t["state"] for t in status["tasks"]] == ["merged"] * 7
    assert all(t["merged_commit"] for t in status["tasks"])
    assert not (pg_home / "corral.db").exists()
    shutil.rmtree(Path(out["origin"]).parent, ignore_errors=True)


def test_the_meter_hands_out_each_usage_once_under_concurrent_takers(pg_url: str) -> None:
    from corral.security.metering import Meter
    from corral.security.policy import LlmPolicy
    from corral.security.types import Usage
    from corral.store import open_store

    meter = Meter(open_store(pg_url))
    meter.set_limit("sb-pg", 1000, None, task_id="t", token_label="the task's token budget")
    for _ in range(40):
        meter.record("sb-pg", Usage(input_tokens=10, output_tokens=15, model="claude-x",
                                    provider="anthropic"), task_id="t")
    got: list[int] = []

    def take() -> None:
        for _ in range(10):
            got.append(meter.take("sb-pg").tokens)

    threads = [threading.Thread(target=take) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(got) == 40 * 25  # every record once, whoever took it
    assert meter.check("sb-pg", LlmPolicy()) is not None  # 1000 tokens: the limit
    lim = meter.limit("sb-pg")
    assert lim is not None and lim.refusals == 1 and "task's token budget" in str(
        lim.last_refusal)
