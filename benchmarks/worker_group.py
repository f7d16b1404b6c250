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

import os
import signal
import subprocess
import sys
from types import FrameType

from pipeline.tools.orphan import wrap


def main(argv: list[str]) -> int:
    n, cmd = int(argv[0]), argv[1:]
    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        for c in children:
            if c.poll() is None:
                c.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # a node name each, as replicas on different hosts have
    children += [subprocess.Popen(wrap([*cmd, "--hostname", f"slot{i}@%h"])) for i in range(n)]
    pids = {c.pid: c for c in children}
    first: int | None = None
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pids.pop(pid, None) is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if first is None:
            first = 128 - code if code < 0 else code
            stop()  # the others go too
    return first or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
