"""The lab's stop request: a Ctrl-C or SIGTERM while the lab runs its mesh is a flag the
loop looks at, so it cannot be lost wherever the main thread is when it comes; a second
one interrupts."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline.tools.lab.lab import StopRequest, _signals_as


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_comes_during_a_del_is_not_lost(sig: int) -> None:
    stop = StopRequest()
    with _signals_as(stop.handler):
        obj = _SignalsWhileCollected(sig)
        del obj
        assert stop.requested, f"signal {sig} was lost"
        stop.wait(3600)  # returns at once: the stop was requested


def test_a_second_signal_interrupts() -> None:
    stop = StopRequest()
    with _signals_as(stop.handler):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            stop.wait(3600)  # the handler raises before this could return


def test_the_handlers_of_before_are_back_afterwards() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with _signals_as(StopRequest().handler):
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before
