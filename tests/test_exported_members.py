"""The public API is what ``__all__`` says, and every name in it exists (as in httpx)."""

import corral
import corral.compute


def test_all_exports_exist_and_are_listed() -> None:
    for mod in (corral, corral.compute):
        public = {n for n in dir(mod) if not n.startswith("_")} - {
            "annotations", "compute", "errors", "settings", "store", "config", "testing",
            "cli", "security", "orchestrator", "harness", "doctor", "devcontainer",
            "server"}
        listed = set(mod.__all__)
        assert listed <= set(dir(mod)), listed - set(dir(mod))
        # submodules imported as attributes are not API; everything else must be listed
        missing = {n for n in public - listed if not hasattr(getattr(mod, n), "__path__")
                   and not getattr(getattr(mod, n), "__file__", None)}
        assert not missing, f"{mod.__name__} exposes unlisted names: {sorted(missing)}"
