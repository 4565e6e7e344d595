"""Background work of a run (spares, teardown) yields the CPU to the tasks'."""

from __future__ import annotations

import os
import threading

from corral.orchestrator.sandboxes import BACKGROUND_NICE, SandboxFactory


def test_reaper_and_spare_threads_run_niced_and_the_caller_does_not() -> None:
    factory = SandboxFactory("unused", "run-test")
    seen: dict[str, int] = {}

    def nice(name: str) -> None:
        seen[name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        factory._reaper.submit(nice, "reaper").result(timeout=10)
        factory._filler.submit(nice, "filler").result(timeout=10)
    finally:
        factory.close()
    nice("caller")
    base = seen["caller"]
    assert seen["reaper"] == seen["filler"] == min(base + BACKGROUND_NICE, 19)
