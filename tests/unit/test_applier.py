"""The worker's batch application against an in-memory target."""

from __future__ import annotations

from collections import Counter

from pipeline.batching import Change, make_batches
from pipeline.fence import FenceRecord, GenRecord
from pipeline.layout import Op, fence_key, gen_key
from pipeline.store import MemoryTargetStore
from pipeline.wire import Batch
from workers.tasks import apply_all


def setup(n_shards: int = 2, per_shard: int = 300) -> tuple[MemoryTargetStore, list[Batch]]:
    store = MemoryTargetStore()
    store.put(gen_key("a"), GenRecord(1, n_shards, "id", 7).encode())
    batches: list[Batch] = []
    for s in range(n_shards):
        shard = f"nodes-{s}"
        store.put(fence_key("a", shard), FenceRecord(1, (10, 0)).encode())
        changes = [
            Change(f"{shard}/{i}".encode(), Op.PUT, b"v", (11 + i, 0)) for i in range(per_shard)
        ]
        batches += make_batches(
            source="a",
            target="b",
            shard=shard,
            gen=1,
            prev=(10, 0),
            changes=changes,
            max_ops=127,
            max_bytes=10**6,
        )
    return store, batches


def test_a_task_applies_its_batches_in_any_order() -> None:
    """Batches given in reverse chain order still all land, each after its predecessor."""
    store, batches = setup()
    outcomes: Counter[str] = Counter()
    assert apply_all(store, list(reversed(batches)), outcomes, gap_wait=0.0) == []
    assert outcomes["applied"] == len(batches)
    assert outcomes["ops_applied"] == 600
    assert sum(1 for k in store.data if k.startswith(b"nodes-")) == 600


def test_a_missing_predecessor_leaves_the_batch_waiting() -> None:
    """Without its predecessor a batch is returned as waiting; the others land."""
    store, batches = setup(n_shards=1)
    outcomes: Counter[str] = Counter()
    waiting = apply_all(store, batches[1:], outcomes, gap_wait=0.01)
    assert waiting == batches[1:]
    assert outcomes["applied"] == 0
    assert apply_all(store, batches, outcomes, gap_wait=0.0) == []
    assert outcomes["applied"] == len(batches)
    again: Counter[str] = Counter()
    assert apply_all(store, batches, again, gap_wait=0.0) == []
    assert again == Counter(duplicate=len(batches))
