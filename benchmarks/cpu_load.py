"""`python benchmarks/cpu_load.py SHARE`: keep one core busy for SHARE (0 to 1) of every 10 ms,
and sleep the rest, until stopped: a neighbour that takes that much of the machine.

The project's machine is shared with other guests, and in its slow hours everything costs
more CPU. A benchmark that runs this beside the product (lag.py `--load`) measures the
product on a machine with less to spare, on demand rather than by the hour. It is not the
same as a slow hour: it takes cores away, while a slow hour makes every instruction and
every wake-up dearer.
"""

from __future__ import annotations

import sys
import time

PERIOD = 0.01


def main(argv: list[str]) -> int:
    share = float(argv[0])
    if not 0 < share <= 1:
        raise SystemExit("SHARE must be over 0 and at most 1")
    busy = share * PERIOD
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < busy:
            pass  # the load itself
        if share < 1:
            time.sleep(PERIOD - busy)  # the share of the period left to the others


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
