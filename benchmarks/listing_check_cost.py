"""What the listing check (SourceFeed.listing_gone) costs a source etcd: the two reads it
makes per resource at a listing's revision, a count-only read and a read of the range's
newest write, on a real etcd holding N identities of about 300 bytes each.

    python benchmarks/listing_check_cost.py [--keys 50000] [--repeat 5]

etcd sorts by mod revision, and applies a mod revision filter, only after it has read
every key of the range at that revision, so the second read grows with the range; the
first only walks the index. The script prints each read's wall time, every repetition.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.clients.etcd import Etcd
from pipeline.tools.cilium_state import write_items
from pipeline.tools.servers import EtcdServer

PREFIX = b"cilium/state/identities/v1/id/"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="kvmesh-listing-")) / "etcd")
    server.start()
    try:
        etcd = Etcd(server.cluster())
        labels = b"k8s:app=x;" * 30
        write_items(etcd, ((PREFIX + str(100_000 + i).encode(), labels) for i in range(args.keys)))
        for _ in range(200):  # writes past the newest identity, as a mesh makes them
            etcd.put(b"cilium/cache/x", b"y")
        at = etcd.revision()
        for _ in range(50):  # and the listing's revision in the past
            etcd.put(b"cilium/cache/x", b"y")
        reads: dict[str, Callable[[], int]] = {
            "count": lambda: etcd.count(PREFIX, at),
            "newest write": lambda: etcd.latest_change(PREFIX, 0, False, at),
        }
        for name, read in reads.items():
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                answer = read()
                times.append((time.perf_counter() - start) * 1000)
            shown = " ".join(f"{t:.1f}" for t in times)
            print(f"{name:>13} at revision {at} of {args.keys} keys: {answer}; ms: {shown}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
