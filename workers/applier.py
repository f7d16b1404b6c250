"""Apply one batch to one target under its shard's fence. Plain code around a TargetStore:
the Celery task only decodes the message and owns the retry policy."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.fence import Decision, FenceRecord, decide
from pipeline.store import TargetStore
from pipeline.wire import Batch

# A compare that fails means another writer moved the fence or the generation between our
# read and our write; decide again. Bounded so a livelock cannot pin a worker.
_MAX_RACES = 50


def apply_batch(
    store: TargetStore,
    batch: Batch,
    *,
    gap_wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Decision:
    """Apply *batch* if the fence admits it. Returns the decision taken.

    A batch whose predecessor has not landed is re-checked for up to *gap_wait* seconds
    (another worker usually holds the predecessor right now) before GAP is returned.
    """
    deadline = clock() + gap_wait
    delay = 0.002
    races = 0
    while True:
        seen = store.read_fence(batch.source, batch.shard)
        decision = decide(batch.gen, batch.prev, batch.pos, seen.gen, seen.fence)
        if decision is Decision.APPLY:
            fence = FenceRecord(batch.gen, batch.pos, batch.done)
            if store.commit(batch.source, batch.shard, seen, batch.ops, fence):
                return Decision.APPLY
            races += 1
            if races >= _MAX_RACES:
                return Decision.GAP
            continue
        if decision is Decision.GAP and clock() < deadline:
            sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        return decision
