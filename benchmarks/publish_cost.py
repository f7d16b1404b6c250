"""What publishing one task costs the watcher: kvmesh's publisher (the payload signed and put
in a hand-written Celery message, one LPUSH) against Celery's `send_task` of the same signed
payload, on a real Redis.

    python benchmarks/publish_cost.py [--ops-per-batch 127] [--batches 4] [--rounds 7]

Each round times 100 publishes of each, alternating, and empties the queue between them; the
script prints the median, minimum and maximum per task. The task is a snapshot task of the
initial sync: 4 batches of 127 identities.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

import benchcommon  # noqa: F401  # first: it puts this checkout's product on sys.path
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from pipeline.clients.broker import redis_at
from pipeline.clients.publisher import RedisPublisher
from pipeline.protocol.layout import Op
from pipeline.protocol.names import TASK_NAME
from pipeline.protocol.wire import Batch, Operation, Signer, SigningKeys, encode_task
from pipeline.tools.cilium_state import identity_id, identity_labels
from pipeline.tools.servers import RedisServer

QUEUE = "kvmesh.cluster-a"


def snapshot_batches(batches: int, ops: int) -> list[Batch]:
    out, n = [], 0
    for s in range(batches):
        puts = []
        for _ in range(ops):
            n += 1
            key = f"cilium/cache/identities/v1/cluster-a/id/{identity_id(1, n)}".encode()
            puts.append(Operation(Op.PUT, key, identity_labels("cluster-a", n).encode()))
        out.append(
            Batch("cluster-a", "cluster-b", f"identities-{s}", 3, (9, 0), (10, s), tuple(puts))
        )
    return out


def task_args(doc: str) -> argparse.Namespace:
    """The command line of a benchmark of one snapshot task's cost (*doc*: its docstring):
    the task's shape and the rounds to time."""
    ap = argparse.ArgumentParser(description=doc.split("\n", maxsplit=1)[0])
    ap.add_argument("--ops-per-batch", type=int, default=127)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    return ap.parse_args()


def main() -> int:
    args = task_args(__doc__)
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        batches = snapshot_batches(args.batches, args.ops_per_batch)
        signer = Signer(SigningKeys((b"k" * 32,)))
        client = redis_at(server.url)
        ours = RedisPublisher(QUEUE, client, signer, args.batches)
        app = Celery("bench", broker=server.url, set_as_current=False)
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_queues=[Queue(QUEUE, routing_key=QUEUE)],  # type: ignore[no-untyped-call]
            task_create_missing_queues=False,
        )
        with app.producer_or_acquire() as producer:

            def celery() -> None:
                app.send_task(
                    TASK_NAME,
                    args=[encode_task(batches, signer)],
                    argsrepr="[...]",
                    kwargsrepr="{}",
                    queue=QUEUE,
                    routing_key=QUEUE,
                    producer=producer,
                    retry=False,
                )

            def kvmesh() -> None:
                ours.publish(batches)

            times: dict[str, list[float]] = {"Celery send_task": [], "kvmesh publisher": []}
            for _ in range(args.rounds):
                for name, fn in (("Celery send_task", celery), ("kvmesh publisher", kvmesh)):
                    times[name].append(timeit.timeit(fn, number=100) / 100 * 1000)
                    client.delete(QUEUE)
        ops = args.batches * args.ops_per_batch
        for name, ts in times.items():
            print(
                f"{name:17} {statistics.median(ts):5.2f} ms per task of {ops} operations "
                f"(min {min(ts):.2f}, max {max(ts):.2f})"
            )
        first, second = (statistics.median(t) for t in times.values())
        print(f"ratio kvmesh/Celery: {second / first:.2f}")
        client.close()
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
