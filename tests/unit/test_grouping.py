"""How batches are packed into tasks: many small ones together, large ones spread out."""

from __future__ import annotations

from pipeline.clients.publisher import MAX_OPS_PER_TASK, group_batches
from pipeline.protocol.layout import Op
from pipeline.protocol.wire import Batch, Operation


def batch(target: str, ops: int, shard: int = 0) -> Batch:
    return Batch(
        source="a",
        target=target,
        shard=f"nodes-{shard}",
        gen=1,
        prev=(1, 0),
        pos=(2, 0),
        ops=tuple(Operation(Op.PUT, b"k%d" % i, b"v") for i in range(ops)),
    )


def test_small_batches_for_many_targets_share_a_task() -> None:
    small = [batch(f"t{i}", 2) for i in range(100)]
    assert [len(g) for g in group_batches(small, 64)] == [64, 36]


def test_full_batches_spread_over_tasks_for_several_workers() -> None:
    full = [batch("t", 127, shard=i) for i in range(40)]
    groups = group_batches(full, 64)
    assert all(sum(len(b.ops) for b in g) <= MAX_OPS_PER_TASK for g in groups)
    assert [len(g) for g in groups] == [MAX_OPS_PER_TASK // 127] * (40 // (MAX_OPS_PER_TASK // 127))
    assert [b for g in groups for b in g] == full  # in order, nothing lost


def test_a_batch_larger_than_the_cap_gets_a_task_of_its_own() -> None:
    big = [batch("t", 5), batch("t", MAX_OPS_PER_TASK + 10), batch("t", 5)]
    assert [len(g) for g in group_batches(big, 64)] == [1, 1, 1]


def test_a_run_of_one_shard_is_never_split_when_it_fits_a_task() -> None:
    """Consecutive batches of a shard go together: split over two tasks, the second task's
    worker would wait for the first's."""
    runs = [batch("t", 127, shard=s) for s in range(3) for _ in range(2)]  # 3 runs of 254 ops
    groups = group_batches(runs, 64, max_ops=512)
    assert [[int(b.shard.split("-")[1]) for b in g] for g in groups] == [
        [0, 0, 1, 1],
        [2, 2],
    ]
    assert [b for g in groups for b in g] == runs


def test_a_burst_becomes_tasks_of_one_shard_each() -> None:
    """The watcher cuts a burst into segments of a task's worth of full batches per shard,
    round robin; each segment fills one task, so consecutive tasks touch different shards."""
    seg = MAX_OPS_PER_TASK // 127
    segments = [batch("t", 127, shard=s) for s in range(16) for _ in range(seg)]
    groups = group_batches(segments, 64)
    assert len(groups) == 16
    assert all(len({b.shard for b in g}) == 1 for g in groups)


def shards_of(groups: list[list[Batch]]) -> list[list[int]]:
    return [[int(b.shard.split("-")[1]) for b in g] for g in groups]


def test_a_flush_of_many_shards_holds_one_transaction_per_task() -> None:
    """A flush at a burst's start touches every shard, and the next flush's task follows it
    in all of them. With the target's transaction size given, the flush is cut into tasks
    of one transaction each (operations and a fence per shard), on disjoint shards, which
    the pool applies side by side."""
    flush = [batch("t", 25, shard=s) for s in range(16)]
    assert shards_of(group_batches(flush, 64)) == [list(range(16))]  # one task of 400 ops
    groups = group_batches(flush, 64, txn_ops=128)
    assert shards_of(groups) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert all(sum(len(b.ops) + 1 for b in g) <= 128 for g in groups)
    assert [b for g in groups for b in g] == flush
    # exactly one transaction's worth fits: 4 x (31 + 1) = 128
    exact = [batch("t", 31, shard=s) for s in range(5)]
    assert shards_of(group_batches(exact, 64, txn_ops=128)) == [[0, 1, 2, 3], [4]]


def test_one_transaction_per_task_is_counted_per_target() -> None:
    """Each target's batches are their own transaction: small batches for many targets
    still share a task, and only a target's own shards add up."""
    small = [batch(f"t{i}", 2) for i in range(100)]
    assert [len(g) for g in group_batches(small, 64, txn_ops=128)] == [64, 36]
    two = [batch(t, 60, shard=s) for s in range(2) for t in ("x", "y")]  # x0 y0 x1 y1
    assert [[(b.target, b.shard) for b in g] for g in group_batches(two, 64, txn_ops=128)] == [
        [("x", "nodes-0"), ("y", "nodes-0"), ("x", "nodes-1"), ("y", "nodes-1")]
    ]  # 60 + 1 + 60 + 1 = 122 for each target
    three = [batch("x", 60, shard=s) for s in range(3)]
    assert shards_of(group_batches(three, 64, txn_ops=128)) == [[0, 1], [2]]


def test_a_run_of_one_shard_stays_whole_when_transactions_are_counted() -> None:
    """A shard's consecutive batches are applied one after another whatever the task, so
    the limit never splits a run; the next shard's batch goes to a task of its own."""
    runs = [batch("t", 127, shard=0), batch("t", 35, shard=0), batch("t", 35, shard=1)]
    assert shards_of(group_batches(runs, 64, txn_ops=128)) == [[0, 0], [1]]
    assert shards_of(group_batches(runs, 64)) == [[0, 0, 1]]
