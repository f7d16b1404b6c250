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


def test_a_batch_the_target_refuses_is_split_and_the_oversized_key_recorded() -> None:
    """Over the target's request limit, the batch lands in parts; a single value the target
    cannot take is skipped, its stale copy deleted, and the refusal recorded."""
    from pipeline.fence import Decision
    from pipeline.layout import rejected_prefix
    from pipeline.wire import Operation
    from workers.applier import apply_batch

    store = MemoryTargetStore(max_request_bytes=4000)
    store.put(gen_key("a"), GenRecord(1, 1, "id", 7).encode())
    store.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0)).encode())
    store.put(b"big", b"old small value")
    ops = tuple(Operation(Op.PUT, f"k{i}".encode(), b"x" * 100) for i in range(60))
    batch = Batch(
        "a", "b", "nodes-0", 1, (10, 0), (11, 0), (*ops, Operation(Op.PUT, b"big", b"y" * 5000))
    )
    refused: list[bytes] = []
    decision = apply_batch(store, batch, on_reject=lambda op, _r: refused.append(op.key))
    assert decision is Decision.APPLY
    assert refused == [b"big"]
    assert all(f"k{i}".encode() in store.data for i in range(60))
    assert b"big" not in store.data
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (11, 0))
    records = [k for k in store.data if k.startswith(rejected_prefix("a"))]
    assert len(records) == 1
