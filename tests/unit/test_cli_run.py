"""`kvmesh watch` ends when a watcher thread dies, so that a supervisor restarts it."""

from __future__ import annotations

import threading

from pipeline.tools.cli import run_watchers


class Fake:
    def __init__(self, name: str, fail: bool) -> None:
        self.name = name
        self.fail = fail
        self.stopped = threading.Event()

    def run(self) -> None:
        if self.fail:
            raise RuntimeError("a bug")
        self.stopped.wait(30)

    def stop(self) -> None:
        self.stopped.set()


def test_a_dead_watcher_thread_stops_the_others_and_is_reported() -> None:
    """One watcher failing stops every other one and is named: the process then exits
    non-zero instead of running on without that source."""
    ok, bad = Fake("a", fail=False), Fake("b", fail=True)
    assert run_watchers([ok, bad]) == ["b"]
    assert ok.stopped.is_set()


def test_watchers_that_stop_cleanly_report_nothing() -> None:
    """A normal stop is not a failure."""
    w = Fake("a", fail=False)
    w.stop()
    assert run_watchers([w]) == []
