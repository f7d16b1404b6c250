"""What a resync's Python costs the watcher per key, in one process, with no server: the
listing's rewrite and checks, the merge against an empty target (a new target's first
resync) and the snapshot cutter, then grouping and signing the batches into task
payloads. The source is an in-memory listing of N identities (what the client hands over
after gRPC has parsed a page), so neither gRPC nor Redis is in the figures.

    python benchmarks/resync_cost.py [--keys 50000] [--rounds 7] [--code DIR ...]

It prints the CPU microseconds per key of each stage, the minimum and the median of the
rounds. With --code, each round runs every checkout named (this one: .) in a process of
its own, turn about, and the script prints, per checkout, the median of the rounds' best
of three: on this shared machine a single run moves by half from one minute to the next.
The listing's stage is the same code in most versions, and shows how much the machine
moved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# the product measured: this checkout's, or the one a parent names for a round (--code)
CODE = os.environ.get("RESYNC_COST_CODE")
if CODE:
    sys.path.insert(0, CODE)
else:
    import benchcommon  # noqa: F401  # it puts this checkout's product on sys.path

from pipeline.clients.etcd import KV  # noqa: E402
from pipeline.clients.publisher import group_batches  # noqa: E402
from pipeline.protocol.layout import RESOURCE_BY_NAME, Layout  # noqa: E402
from pipeline.protocol.snapshot import SnapshotCutter  # noqa: E402
from pipeline.protocol.wire import Batch, Signer, SigningKeys, encode_task_json  # noqa: E402
from pipeline.source import resync  # noqa: E402
from pipeline.source.listing import iter_resource  # noqa: E402
from pipeline.tools.cilium_state import identity_id, identity_labels  # noqa: E402

SOURCE, TARGET, CLUSTER_ID = "cluster-a", "cluster-b", 1
IDENTITIES = RESOURCE_BY_NAME["identities"]


class Listing:
    """A source etcd's scan, from memory."""

    def __init__(self, kvs: list[KV]) -> None:
        self._kvs = kvs

    def scan(
        self, prefix: bytes, revision: int | None = None, page: int = 2000, exact: bool = False
    ) -> tuple[int, Iterator[KV]]:
        if not self._kvs[0].key.startswith(prefix):
            return revision or 0, iter(())
        return revision or 0, iter(self._kvs)


class EmptyTarget:
    source, name = SOURCE, TARGET

    class leases:  # stands for TargetLeases
        @staticmethod
        def mine(_lease: int) -> bool:
            return True

    def cache(self, _res: Any) -> Iterator[KV]:
        return iter(())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--code", type=Path, nargs="+", help="checkouts to compare, turn about")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a round's child
    args = ap.parse_args()
    if args.code:
        compare(args.code, args.keys, args.rounds)
        return
    best = measure(args.keys, args.rounds, quiet=args.json)
    if args.json:
        print(json.dumps(best))


def compare(codes: list[Path], keys: int, rounds: int) -> None:
    per: dict[Path, list[dict[str, float]]] = {code: [] for code in codes}
    for r in range(rounds):
        for code in codes if r % 2 == 0 else reversed(codes):
            out = subprocess.run(
                [sys.executable, __file__, "--keys", str(keys), "--rounds", "3", "--json"],
                env=dict(os.environ, RESYNC_COST_CODE=str(code.resolve())),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            per[code].append(json.loads(out.splitlines()[-1]))
    for code, runs in per.items():
        print(f"{code}:")
        for stage in runs[0]:
            values = sorted(run[stage] for run in runs)
            print(
                f"  {stage:<30} {statistics.median(values):6.2f} µs/key, median of {rounds} "
                f"rounds' best of three ({values[0]:.2f}-{values[-1]:.2f})"
            )


def measure(keys: int, rounds: int, quiet: bool = False) -> dict[str, float]:
    """Each stage's CPU µs per key, the best of *rounds* (printed unless *quiet*)."""
    prefix = IDENTITIES.source_prefix(SOURCE)
    kvs = sorted(
        (
            KV(
                prefix + str(identity_id(CLUSTER_ID, i)).encode(),
                identity_labels(SOURCE, i).encode(),
                1 + i,
                0,
            )
            for i in range(keys)
        ),
        key=lambda kv: kv.key,
    )
    source, layout = Listing(kvs), Layout(SOURCE, CLUSTER_ID)
    signer = Signer(SigningKeys((b"k" * 32,)))
    revision = len(kvs) + 1

    def listing() -> None:
        for _ in iter_resource(
            source, layout, IDENTITIES, revision, page=2000, max_bytes=1 << 20, on_reject=print
        ):
            pass

    def resync_run(publish: Callable[[list[Batch]], None]) -> None:
        cutter = SnapshotCutter(
            source=SOURCE, target=TARGET, gen=1, revision=revision, max_ops=127, max_bytes=1 << 20
        )
        snap = resync.Snapshot(EmptyTarget(), cutter, publish)  # type: ignore[arg-type]
        resync.run(
            source,  # type: ignore[arg-type]
            layout,
            revision,
            [snap],
            shard_count=16,
            page=2000,
            max_bytes=1 << 20,
            on_reject=print,
            keep_going=lambda: True,
        )

    def encoded(batches: list[Batch]) -> None:
        for group in group_batches(batches, 8):
            encode_task_json(group, signer)

    stages = {
        "listing (rewrite and checks)": listing,
        "listing, merge and cutter": lambda: resync_run(lambda _b: None),
        "the same, payloads signed": lambda: resync_run(encoded),
    }
    best: dict[str, float] = {}
    for name, stage in stages.items():
        stage()  # warm
        per_key = []
        for _ in range(rounds):
            t = time.process_time()
            stage()
            per_key.append((time.process_time() - t) / len(kvs) * 1e6)
        best[name] = min(per_key)
        if not quiet:
            print(
                f"{name:<30} {min(per_key):6.2f} µs/key min, "
                f"{statistics.median(per_key):6.2f} median ({rounds} rounds)"
            )
    return best


if __name__ == "__main__":
    main()
