"""Commands in a real sandbox: results, streaming, timeouts, background, reconnect."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from corral import CommandTimeout, InvalidState, Sandbox, UsageError


def test_result_fields(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert not r.ok and r.duration > 0


def test_argv_is_not_shell_parsed(sandbox: Sandbox) -> None:
    r = sandbox.commands.run(["printf", "%s|", "a b", "$HOME", ";"])
    assert r.stdout == "a b|$HOME|;|"


def test_environment_is_clean_and_extendable(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("env | sort", env={"FOO": "bar"})
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env["FOO"] == "bar"
    assert env["HOME"] == "/home/agent" and env["USER"] == "agent"
    # nothing leaks from the host's environment
    assert "CORRAL_HOME" not in env and "VIRTUAL_ENV" not in env


def test_cwd(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("pwd").stdout == "/workspace\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    r = sandbox.commands.run("pwd", cwd="/does/not/exist")
    assert r.exit_code != 0 and "/does/not/exist" in r.stderr


def test_stdin(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("tr a-z A-Z", stdin=b"hello").stdout == "HELLO"


def test_streaming_callbacks_see_output_before_exit(sandbox: Sandbox) -> None:
    seen: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    r = sandbox.commands.run("echo first; sleep 0.5; echo second",
                             on_stdout=lambda b: seen.append((time.monotonic() - t0, b)))
    assert r.stdout == "first\nsecond\n"
    assert b"".join(b for _, b in seen) == b"first\nsecond\n"
    assert seen[0][0] < 0.4  # the first line arrived while the command still ran


def test_timeout_kills_the_whole_group(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("sleep 30 & sleep 30; echo never", timeout=0.5)
    assert r.timed_out and r.exit_code == 124 and "never" not in r.stdout
    # nothing of the command is left
    ps = sandbox.commands.run("ps -eo args=").stdout
    assert "sleep 30" not in ps and "sleep infinity" in ps


def test_empty_command_is_a_usage_error(sandbox: Sandbox) -> None:
    with pytest.raises(UsageError):
        sandbox.commands.run("   ")
    with pytest.raises(UsageError):
        sandbox.commands.run([])


def test_background_handle(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("echo started; sleep 0.3; echo done; exit 7", background=True)
    assert h.running
    chunks = b"".join(c for _, c in h.iter_output())
    assert chunks == b"started\ndone\n"
    r = h.wait(5)
    assert r.exit_code == 7
    assert [x.id for x in sandbox.commands.list()] == [h.id]


def test_background_kill_and_wait_timeout(sandbox: Sandbox) -> None:
    h = sandbox.commands.run(["sleep", "60"], background=True)
    with pytest.raises(CommandTimeout):
        h.wait(0.2)
    h.kill()
    assert h.wait(5).exit_code == 137


def test_background_outlives_its_creator_and_reconnects(sandbox: Sandbox) -> None:
    code = (
        "from corral import Sandbox\n"
        f"h = Sandbox.connect({sandbox.id!r}).commands.run('sleep 0.5; echo bg', background=True)\n"
        "print(h.id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    h = sandbox.commands.connect(out.stdout.strip())
    assert h.wait(10).stdout_bytes == b"bg\n"


def test_stopped_sandbox_refuses_commands(sandbox: Sandbox) -> None:
    sandbox.stop()
    with pytest.raises(InvalidState, match="stopped"):
        sandbox.commands.run("true")


def test_bash_used_for_strings(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("set -o pipefail; false | true; echo $?")
    assert r.stdout.strip().endswith("1")
