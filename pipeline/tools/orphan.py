"""`python -m pipeline.tools.orphan PARENT_PID COMMAND...`: run COMMAND so that the kernel stops it
(SIGTERM) when its parent dies, which leaves no server or worker behind a killed lab, test
run or benchmark.

A launcher rather than a preexec_fn: the parents that start children here often run gRPC
threads, and running Python code between fork and exec in such a process can deadlock (gRPC's
fork handlers). The death signal survives execve.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def wrap(cmd: list[str]) -> list[str]:
    """COMMAND, prefixed so that it dies with the calling process (Linux; else unchanged)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-m", "pipeline.tools.orphan", str(os.getpid()), *cmd]


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        raise SystemExit(1)
    os.execvp(cmd[0], cmd)  # noqa: S606 - argv from our own spawners, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
