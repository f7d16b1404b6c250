"""Log lines kvmesh writes: one line per event, whatever the event carries.

Keys, task IDs and reasons that come from outside can hold newlines or terminal escapes;
the message of every record is escaped before it is written. A traceback keeps its lines,
but each is escaped and indented by a tab: an exception's text can come from outside too (a
message's content type, in a decoding error Celery logs), and no line of it may pass for a
record of its own. Celery's own lines go through the same formatter in a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def one_line(text: str) -> str:
    """Escape what is not printable (the parts kvmesh puts in a message are escaped by
    errors.show_key already; this catches what Celery and libraries put there)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def indented(text: str) -> str:
    """*text*'s lines, each escaped and after a tab."""
    return "\n".join("\t" + one_line(line) for line in text.splitlines())


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return indented(super().formatStack(stack_info))


def configure(level: str | int = "INFO") -> None:
    """Log to stderr, one line per record, at *level* (a name or a number)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@dataclass
class _Window:
    start: float
    logged: int = 0
    held: int = 0


class LineBudget:
    """At most *lines* log lines per kind of event in each *window* seconds: a source that
    holds or writes thousands of bad keys must not fill the log with a line for each (every
    one is still counted in a metric). What a window held back is said in one line once
    that window is over (`overdue`)."""

    def __init__(self, lines: int, window: float, clock: Callable[[], float]) -> None:
        self.lines = lines
        self.window = window
        self.clock = clock
        self._open: dict[str, _Window] = {}
        self._over: list[tuple[str, int, float]] = []

    def take(self, kind: str) -> bool:
        """Whether one more line of *kind* may be logged now (if not, it is counted)."""
        now = self.clock()
        self._close(now)
        window = self._open.get(kind)
        if window is None:
            window = self._open[kind] = _Window(now)
        if window.logged < self.lines:
            window.logged += 1
            return True
        window.held += 1
        return False

    def overdue(self, every: bool = False) -> list[tuple[str, int, float]]:
        """(kind, lines held back, seconds since its window began) of each window that is
        over and held lines back, once each; with *every*, of every window, over or not
        (a process that ends says what it held back)."""
        self._close(self.clock(), every)
        out, self._over = self._over, []
        return out

    def _close(self, now: float, every: bool = False) -> None:
        for kind, w in list(self._open.items()):
            if every or now - w.start >= self.window:
                del self._open[kind]
                if w.held:
                    self._over.append((kind, w.held, now - w.start))
