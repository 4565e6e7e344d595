from corral import Sandbox


def test_create_run_destroy() -> None:
    sbx = Sandbox.create()
    try:
        r = sbx.commands.run("echo hello; id -un")
        assert r.exit_code == 0
        assert r.stdout.split() == ["hello", "agent"]
    finally:
        sbx.destroy()
