"""Flower's SIGTERM handler, replaced (pipeline.tools.flowerapp installs it).

Flower's own handler raises SystemExit from inside the signal handler. A signal that
arrives while a weakref callback or a destructor runs has that exception printed as
"ignored" and dropped, and Flower then runs on (seen once in a test run: its event thread
retried the gone broker for minutes). Celery imports the app module before Flower installs
its handler, so the handler can be replaced by one that raises nothing: it asks the IOLoop
to stop, Flower's start() returns, and the process exits as after Ctrl-C.
"""

from __future__ import annotations

import logging
from typing import Any

import flower.command
from tornado.ioloop import IOLoop

log = logging.getLogger("kvmesh.flower")


def stop_on_sigterm(signum: int, _frame: Any) -> None:
    """Stop the IOLoop from its next iteration; raise nothing."""
    log.info("signal %d: shutting down", signum)
    loop = IOLoop.current()
    loop.add_callback(loop.stop)


def replace_flowers_handler() -> None:
    """Make Flower install stop_on_sigterm instead of its own handler (it looks its handler
    up when its command starts, after the app module is imported)."""
    flower.command.sigterm_handler = stop_on_sigterm
