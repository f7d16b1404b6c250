"""Flower's SIGTERM handler, as kvmesh replaces it."""

from __future__ import annotations

import asyncio

import flower.command
from tornado.ioloop import IOLoop

from pipeline.tools.flowerstop import replace_flowers_handler, stop_on_sigterm


def test_the_sigterm_handler_stops_flowers_loop_and_raises_nothing() -> None:
    """Flower installs kvmesh's handler, which raises nothing (Flower's raised SystemExit,
    which a signal landing in a weakref callback swallows) and stops the IOLoop, so that
    Flower's start() returns."""
    replace_flowers_handler()
    assert flower.command.sigterm_handler is stop_on_sigterm
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        io = IOLoop.current()
        deadline: list[bool] = []
        io.call_later(30, lambda: (deadline.append(True), io.stop()))  # the test's own bound
        io.add_callback(stop_on_sigterm, 15, None)
        io.start()  # returns once stopped
        assert not deadline, "the handler did not stop the loop"
    finally:
        asyncio.set_event_loop(None)
        loop.close()
