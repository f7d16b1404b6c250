"""The lab's stop request: a Ctrl-C or SIGTERM while the lab runs its mesh is a flag the
loop looks at, so it cannot be lost wherever the main thread is when it comes."""

from __future__ import annotations

import os
import signal

from pipeline.tools.lab.lab import _interrupts_as_request


class _SignalsWhileCollected:
    """An object that receives *sig* while Python runs its __del__: where a handler that
    raises KeyboardInterrupt is dropped ("Exception ignored in ...")."""

    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)
        total = 0
        for i in range(10_000):  # bytecode to run the handler in, still inside __del__
            total += i


def test_a_stop_that_comes_during_a_del_is_not_lost() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with _interrupts_as_request() as stop:
            obj = _SignalsWhileCollected(sig)
            del obj
            assert stop.is_set(), f"signal {sig} was lost"


def test_the_handlers_of_before_are_back_afterwards() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with _interrupts_as_request() as stop:
        assert not stop.is_set()
    assert {s: signal.getsignal(s) for s in before} == before
