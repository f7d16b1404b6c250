"""`python benchmarks/worker_group.py N COMMAND...`: run N copies of COMMAND (a `kvmesh worker`
with the solo pool, each with a node name of its own) as one group, the way a deployment runs
N one-slot workers side by side.

The copies stay in this process's session, so that a benchmark pauses, resumes and counts
the CPU of the whole group as of one worker (killpg, session CPU). A SIGTERM or SIGINT (or
this process's end) stops every copy; so does the end of any one of them, so that a
benchmark never goes on measuring with fewer workers than it asked for. The exit code is
the first one to end's (128 + the signal, if a signal ended it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType

from pipeline.tools.orphan import wrap


def main(argv: list[str]) -> int:
    n, cmd = int(argv[0]), argv[1:]
    running: set[int] = set()  # reaped by os.wait below only, so that no code is lost
    # the Popen objects, kept: one dropped would be reaped by the next Popen's clean-up
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(n):  # a node name each, as replicas on different hosts have
        if stopping:
            break
        children.append(subprocess.Popen(wrap([*cmd, "--hostname", f"slot{i}@%h"])))
        running.add(children[-1].pid)
    if stopping:  # asked while the copies started: the last one may have missed it
        stop()
    first: int | None = None
    while running:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in running:
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if first is None:
            first = 128 - code if code < 0 else code
            stop()  # the others go too
    return first or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
