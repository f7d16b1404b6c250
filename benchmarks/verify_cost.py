"""What verifying and decoding one task costs a worker's pool process, for a payload read
from Redis by reference: its text verified as it came (decode_task_text, what a worker does)
against the text parsed first and verified over its canonical bytes written out again (the
way a payload carried in the message itself is verified, and the only way before).

    python benchmarks/verify_cost.py [--ops-per-batch 127] [--batches 4] [--rounds 7]

Each round times 200 of each, alternating; the script prints the median, minimum and
maximum per task of CPU time. The task is a snapshot task of the initial sync (4 batches of
127 identities, by default), the size a backlog's tasks have.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

from publish_cost import snapshot_batches, task_args

from pipeline.protocol.wire import (
    Signer,
    SigningKeys,
    decode_task,
    decode_task_text,
    encode_task_json,
)


def cpu_ms(fn: Callable[[], object], number: int) -> float:
    t0 = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - t0) / number * 1000


def main() -> int:
    args = task_args(__doc__)
    batches = snapshot_batches(args.batches, args.ops_per_batch)
    signer = Signer(SigningKeys((b"k" * 32,)))
    text = encode_task_json(batches, signer).encode()
    assert signer.verify_text(text)
    ways: dict[str, Callable[[], object]] = {
        "parsed, then verified": lambda: decode_task(json.loads(text), signer),
        "verified as it came": lambda: decode_task_text(text, signer),
        "(parsed and decoded, no signature)": lambda: decode_task(json.loads(text), None),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            times[name].append(cpu_ms(fn, 200))
    print(f"a task of {args.batches * args.ops_per_batch} operations, {len(text):,} bytes of JSON")
    for name, ts in times.items():
        print(
            f"{name:35} {statistics.median(ts):5.2f} ms CPU per task "
            f"(min {min(ts):.2f}, max {max(ts):.2f})"
        )
    before, after = (statistics.median(times[n]) for n in list(ways)[:2])
    print(f"ratio as-it-came / parsed-then-verified: {after / before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
