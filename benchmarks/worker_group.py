"""`python benchmarks/worker_group.py N COMMAND...`: run N copies of COMMAND (a `kvmesh worker`
with the solo pool, each with a node name of its own) as one group, the way a deployment runs
N one-slot workers side by side.

The copies stay in this process's session, so that a benchmark pauses, resumes and counts
the CPU of the whole group as of one worker (killpg, session CPU). A SIGTERM (or this
process's end) stops every copy.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType

from pipeline.tools.orphan import wrap


def main(argv: list[str]) -> int:
    n, cmd = int(argv[0]), argv[1:]
    # a node name each, as replicas on different hosts have
    children = [subprocess.Popen(wrap([*cmd, "--hostname", f"slot{i}@%h"])) for i in range(n)]

    def stop(signum: int, frame: FrameType | None) -> None:
        for c in children:
            if c.poll() is None:
                c.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max(c.wait() for c in children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
