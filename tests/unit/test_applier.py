"""The worker's batch application against an in-memory target."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from pipeline.protocol.batching import Change, make_batches
from pipeline.protocol.errors import ForbiddenBatchError, RetryableError
from pipeline.protocol.fence import Decision, FenceRecord, GenRecord
from pipeline.protocol.layout import RESOURCE_BY_NAME, Op
from pipeline.protocol.names import fence_key, gen_key
from pipeline.protocol.sharding import shard_of
from pipeline.protocol.wire import Batch, Operation, Signer, SigningKeys, decode_task, encode_task
from tests.memory_etcd import MemoryEtcd
from workers.applier import apply_batch
from workers.metrics import TimedStore, WorkerMetrics
from workers.store import EtcdTargetStore, FenceView
from workers.tasks import TXNS_PER_TASK, apply_all, check_task, gap_window

NODES = RESOURCE_BY_NAME["nodes"]


def node_keys(shard: str, shards: int, n: int) -> list[bytes]:
    """*n* cache keys of source a's nodes that fall in *shard*."""
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        key = f"cilium/cache/nodes/v1/a/node-{i}".encode()
        if shard_of(NODES, key, shards) == shard:
            out.append(key)
        i += 1
    return out


class Store(EtcdTargetStore):
    """A worker's view of an in-memory target, with the target's own calls at hand."""

    def __init__(self, max_request_bytes: int = 0) -> None:
        super().__init__(MemoryEtcd("b"))
        self.etcd.space.max_request_bytes = max_request_bytes

    def put(self, key: bytes, value: bytes) -> None:
        self.etcd.put(key, value)

    @property
    def data(self) -> dict[bytes, bytes]:
        return self.etcd.items(b"")


def setup(n_shards: int = 2, per_shard: int = 300) -> tuple[Store, list[Batch]]:
    store = Store()
    store.put(gen_key("a"), GenRecord(1, n_shards, "id", 7).encode())
    batches: list[Batch] = []
    for s in range(n_shards):
        shard = f"nodes-{s}"
        store.put(fence_key("a", shard), FenceRecord(1, (10, 0)).encode())
        changes = [
            Change(key, Op.PUT, b"v", (11 + i, 0))
            for i, key in enumerate(node_keys(shard, n_shards, per_shard))
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
    assert sum(1 for k in store.data if k.startswith(b"cilium/cache/nodes/v1/a/")) == 600


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


def test_batches_waiting_for_another_worker_land_together_without_reads_of_their_own() -> None:
    """A predecessor that another worker holds lands a moment later: the batches that waited
    for it are admitted by the next read of all the fences, in one transaction, and the
    fence each waited on is noted for the stall clock."""
    _, batches = setup()
    held = batches[0]  # another worker has it in hand

    class Racing(Store):
        reads = 0
        single_reads = 0

        def read_fences(self, source, shards):  # type: ignore[no-untyped-def]
            Racing.reads += 1
            if Racing.reads == 2:  # while this worker waited, the other one committed
                other = Store()
                other.etcd.space = self.etcd.space
                assert apply_batch(other, held) is Decision.APPLY
            return super().read_fences(source, shards)

        def read_fence(self, source, shard):  # type: ignore[no-untyped-def]
            Racing.single_reads += 1
            return super().read_fence(source, shard)

    store = Racing()
    fresh, _ = setup()
    store.etcd.space = fresh.etcd.space
    outcomes: Counter[str] = Counter()
    gaps: dict[tuple[str, str, str], object] = {}
    assert apply_all(store, batches[1:], outcomes, gap_wait=1.0, gaps=gaps) == []
    assert outcomes["applied"] == len(batches) - 1
    assert Racing.single_reads == 0  # no batch needed the one-batch path
    # one read before the other worker's commit and one after; the task's other
    # transactions go on what it wrote itself
    assert Racing.reads == 2
    assert isinstance(gaps[("a", "b", held.shard)], FenceRecord)  # what it waited on


def test_a_fence_another_worker_moved_under_the_tasks_cache_costs_no_extra_read() -> None:
    """A task keeps the fences it read and wrote, to skip reads between its transactions.
    When another worker moves one of them meanwhile (a redelivered copy of a batch), the
    compare fails and reads the fences back, and every batch still lands exactly once."""
    _, batches = setup()
    redelivered = batches[4]  # nodes-1's second batch, applied by someone else

    class Moving(Store):
        commits = 0
        group_reads = 0

        def read_fences(self, source, shards):  # type: ignore[no-untyped-def]
            Moving.group_reads += 1
            return super().read_fences(source, shards)

        def commit_group(self, source, gen_rev, parts, read_back=()):  # type: ignore[no-untyped-def]
            Moving.commits += 1
            if Moving.commits == 2:
                other = Store()
                other.etcd.space = self.etcd.space
                apply_batch(other, batches[3])
                assert apply_batch(other, redelivered) is Decision.APPLY
            return super().commit_group(source, gen_rev, parts, read_back)

    store = Moving()
    fresh, _ = setup()
    store.etcd.space = fresh.etcd.space
    outcomes: Counter[str] = Counter()
    gens: dict[str, FenceView] = {}  # the worker process's memory of generations
    assert apply_all(store, batches, outcomes, gap_wait=1.0, gens=gens) == []
    # the task's first look, and one after the one-batch path took the duplicate: the
    # failed compare read the fences back, with no read of its own
    assert Moving.group_reads == 2
    assert outcomes["applied"] + outcomes["duplicate"] == len(batches)
    assert outcomes["duplicate"] >= 1
    fence = store.etcd.get(fence_key("a", "nodes-1"))
    assert fence is not None and FenceRecord.decode(fence.value).pos == batches[5].pos
    assert sum(1 for k in store.data if k.startswith(b"cilium/cache/nodes/v1/a/")) == 600


def test_a_batch_the_target_refuses_is_split_and_the_oversized_key_recorded() -> None:
    """Over the target's request limit, the batch lands in parts; a single value the target
    cannot take is skipped, its stale copy deleted, and the refusal recorded."""
    from pipeline.protocol.fence import Decision
    from pipeline.protocol.names import rejected_prefix
    from pipeline.protocol.wire import Operation
    from workers.applier import apply_batch

    store = Store(max_request_bytes=4000)
    store.put(gen_key("a"), GenRecord(1, 1, "id", 7).encode())
    store.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0)).encode())
    keys = node_keys("nodes-0", 1, 61)
    big = keys.pop()
    store.put(big, b"old small value")
    ops = tuple(Operation(Op.PUT, k, b"x" * 100) for k in keys)
    batch = Batch(
        "a", "b", "nodes-0", 1, (10, 0), (11, 0), (*ops, Operation(Op.PUT, big, b"y" * 5000))
    )
    refused: list[bytes] = []
    decision = apply_batch(store, batch, on_reject=lambda op, _r: refused.append(op.key))
    assert decision is Decision.APPLY
    assert refused == [big]
    assert all(k in store.data for k in keys)
    assert big not in store.data
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (11, 0))
    records = [k for k in store.data if k.startswith(rejected_prefix("a"))]
    assert len(records) == 1


def test_refusal_records_too_many_for_one_transaction_land_in_parts_on_no_lease() -> None:
    """Refusals whose records together exceed the target's limit are committed in parts
    before the fence moves, on no lease (a cache lease's end must not take them), while the
    batch's own keys keep its lease."""
    from pipeline.protocol.fence import Decision
    from pipeline.protocol.names import rejected_key
    from pipeline.protocol.wire import Operation
    from workers.applier import apply_batch

    store = Store(max_request_bytes=1500)
    lease = store.etcd.grant_lease(60)
    store.put(gen_key("a"), GenRecord(1, 1, "id", 7).encode())
    store.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0)).encode())
    keys = node_keys("nodes-0", 1, 12)
    big, small = keys[:8], keys[8:]
    ops = (
        *(Operation(Op.PUT, k, b"y" * 2000) for k in big),
        *(Operation(Op.PUT, k, b"x" * 10) for k in small),
    )
    batch = Batch("a", "b", "nodes-0", 1, (10, 0), (11, 0), ops, lease=lease)
    refused: list[bytes] = []
    decision = apply_batch(store, batch, on_reject=lambda op, _r: refused.append(op.key))
    assert decision is Decision.APPLY
    assert refused == big
    records = [store.etcd.get(rejected_key("a", k)) for k in big]
    assert sum(len(r.key) + len(r.value) for r in records if r) > 1500  # one txn could not
    assert all(r is not None and r.lease == 0 for r in records)
    assert all((kv := store.etcd.get(k)) is not None and kv.lease == lease for k in small)
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (11, 0))


def test_the_layout_is_enforced_whatever_the_signature_says() -> None:
    """A task, even signed, may touch only its source's cache of its shard's resource and
    its source's cluster config, for a configured source other than the target."""
    signer = Signer(SigningKeys((b"s" * 64,)))

    def task(source: str, target: str, shard: str, key: bytes) -> None:
        batch = Batch(source, target, shard, 1, (1, 0), (2, 0), (Operation(Op.PUT, key, b"v"),))
        check_task(decode_task(encode_task([batch], signer), signer), {"a", "b"}, {"a", "b"})

    task("a", "b", "nodes-0", b"cilium/cache/nodes/v1/a/n1")
    task("a", "b", "config-0", b"cilium/cluster-config/a")
    task("a", "b", "identities-1", b"cilium/cache/identities/v1/a/value/old")
    for source, target, shard, key in [
        ("a", "b", "nodes-0", b"cilium/state/nodes/v1/b/evil"),  # the target's own state
        ("a", "b", "nodes-0", b"cilium/cache/nodes/v1/c/n1"),  # another source's cache
        ("a", "b", "nodes-0", b"cilium/cache/ip/v1/a/10.0.0.1"),  # another resource
        ("a", "b", "nodes-0", b"cilium/cluster-config/b"),  # the target's config
        ("a", "b", "config-0", b"cilium/cluster-config/b"),
        ("a", "b", "nodes-0", b"kvmesh/a/gen"),  # kvmesh's own records
        ("a", "b", "nodes-0", b"cilium/cache/nodes/v1/a/"),  # the prefix itself
        ("a", "b", "bogus-0", b"cilium/cache/nodes/v1/a/n1"),
        ("a", "b", "nodes-01", b"cilium/cache/nodes/v1/a/n1"),
        ("a", "a", "nodes-0", b"cilium/cache/nodes/v1/a/n1"),  # a source into itself
        ("z", "b", "nodes-0", b"cilium/cache/nodes/v1/z/n1"),  # not a configured source
        ("a", "z", "nodes-0", b"cilium/cache/nodes/v1/a/n1"),  # not a configured target
    ]:
        try:
            task(source, target, shard, key)
        except ForbiddenBatchError:
            continue
        raise AssertionError(f"accepted {source}->{target} {shard} {key!r}")


def test_a_batch_outside_its_generations_shards_is_forbidden() -> None:
    """A shard the generation does not have, or a key that hashes to another shard, is
    refused at the fence: per-shard order would mean nothing otherwise."""
    store, batches = setup(n_shards=2, per_shard=3)
    wrong = next(b for b in batches if b.shard == "nodes-0")
    moved = Batch(
        wrong.source, wrong.target, "nodes-1", 1, (10, 0), wrong.pos, wrong.ops, wrong.done
    )
    assert apply_batch(store, moved) is Decision.FORBIDDEN
    beyond = Batch(
        wrong.source, wrong.target, "nodes-5", 1, (10, 0), wrong.pos, wrong.ops, wrong.done
    )
    store.put(fence_key("a", "nodes-5"), FenceRecord(1, (10, 0)).encode())
    assert apply_batch(store, beyond) is Decision.FORBIDDEN
    assert apply_batch(store, wrong) is Decision.APPLY


def test_a_batch_outside_its_shard_is_forbidden_in_a_task_of_full_batches() -> None:
    """Through a task's group transactions too: a batch named for one shard whose keys hash
    to another is never written, whether it came up beside a full batch (no room: it waits
    for the next group) or alone, and the task ends with nothing waiting."""
    store, batches = setup(n_shards=2, per_shard=127)
    full = next(b for b in batches if b.shard == "nodes-0")
    other = next(b for b in batches if b.shard == "nodes-1")
    stray = Operation(Op.PUT, node_keys("nodes-0", 2, 128)[-1], b"stray")
    wrong = Batch("a", "b", "nodes-1", 1, (10, 0), other.pos, (stray,))
    outcomes: Counter[str] = Counter()
    assert apply_all(store, [full, wrong], outcomes, gap_wait=0.0) == []
    assert outcomes["applied"] == 1 and outcomes["forbidden"] == 1
    assert stray.key not in store.data
    assert apply_all(store, [wrong], outcomes, gap_wait=0.0) == []
    assert outcomes["forbidden"] == 2 and stray.key not in store.data
    assert apply_all(store, [other], outcomes, gap_wait=0.0) == []  # its shard untouched
    assert outcomes["applied"] == 2


def test_a_corrupt_fence_asks_for_a_resync() -> None:
    """A fence that does not decode is not guessed at: the worker asks for a resync."""
    store, batches = setup(n_shards=1, per_shard=3)
    store.put(fence_key("a", "nodes-0"), b"\xff garbage")
    assert apply_batch(store, batches[0]) is Decision.RESYNC


def test_a_batch_waits_while_another_worker_moves_its_chain_towards_it() -> None:
    """The predecessors of a batch land one by one in another worker, each after longer than
    gap_wait: the task keeps waiting while the fence moves, and applies its batch, instead
    of handing it back to the queue."""
    _, batches = setup(n_shards=1, per_shard=4 * 127)
    assert len(batches) == 4
    theirs, mine = batches[:3], batches[3]

    now = [0.0]  # a fake monotonic clock: only the store and the task's sleeps move it

    class Chain(Store):
        reads = 0

        def read_fences(self, source, shards):  # type: ignore[no-untyped-def]
            # the first look finds the chain where it was; before each later one the
            # other worker has landed one more batch, more than gap_wait after the last
            if 1 <= Chain.reads <= len(theirs):
                other = Store()
                other.etcd.space = self.etcd.space
                assert apply_batch(other, theirs[Chain.reads - 1]) is Decision.APPLY
                now[0] += 0.03
            Chain.reads += 1
            return super().read_fences(source, shards)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    store = Chain()
    fresh, _ = setup(n_shards=1, per_shard=4 * 127)
    store.etcd.space = fresh.etcd.space
    outcomes: Counter[str] = Counter()
    # 3 steps of 0.03 s each: longer than gap_wait each, far inside 20 times gap_wait in all
    waiting = apply_all(store, [mine], outcomes, gap_wait=0.02, clock=lambda: now[0], sleep=sleep)
    assert waiting == []
    assert outcomes["applied"] == 1


def test_a_batch_whose_fence_stands_still_goes_back_to_the_queue() -> None:
    """Nobody moves the chain: after gap_wait the batch is handed back."""
    _, batches = setup(n_shards=1, per_shard=4 * 127)
    store, _ = setup(n_shards=1, per_shard=4 * 127)
    outcomes: Counter[str] = Counter()
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    waiting = apply_all(
        store, [batches[3]], outcomes, gap_wait=0.05, clock=lambda: now[0], sleep=sleep
    )
    assert waiting == [batches[3]]
    assert outcomes["applied"] == 0


class Counting(Store):
    """A Store that counts the worker's reads of fences and its group transactions."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.commits: list[bool] = []

    def read_fences(self, source, shards):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read_fences(source, shards)

    def read_fence(self, source, shard):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read_fence(source, shard)

    def commit_group(self, source, gen_rev, parts, read_back=()):  # type: ignore[no-untyped-def]
        landed, views = super().commit_group(source, gen_rev, parts, read_back)
        self.commits.append(bool(landed))
        return landed, views


def counting(n_shards: int = 2, per_shard: int = 300) -> tuple[Counting, list[Batch]]:
    fresh, batches = setup(n_shards, per_shard)
    store = Counting()
    store.etcd.space = fresh.etcd.space
    return store, batches


def test_a_batch_next_in_its_chain_lands_without_a_read_of_its_fence() -> None:
    """Once a worker process has read a source's generation in a target, a task whose
    batches are next in their chains costs transactions only: each compares the fence with
    the record the batch's predecessor wrote."""
    store, batches = counting()
    gens: dict[str, FenceView] = {}
    first = [b for b in batches if b.prev == (10, 0)]  # the first batch of each shard
    outcomes: Counter[str] = Counter()
    assert apply_all(store, first, outcomes, gap_wait=0.0, gens=gens) == []
    assert store.reads == 1 and gens["a"].gen == 1  # the process learned the generation
    store.reads, store.commits = 0, []
    rest = [b for b in batches if b not in first]
    assert apply_all(store, rest, outcomes, gap_wait=0.0, gens=gens) == []
    assert store.reads == 0
    assert store.commits == [True] * len(store.commits)
    assert outcomes["applied"] == len(batches)
    for shard in ("nodes-0", "nodes-1"):
        last = [b for b in batches if b.shard == shard][-1]
        assert store.read_fence("a", shard).fence == FenceRecord(1, last.pos)
    assert sum(1 for k in store.data if k.startswith(b"cilium/cache/nodes/v1/a/")) == 600


def test_short_batches_of_several_shards_share_one_transaction() -> None:
    """A task of three shards' chains, each a full batch and a short one (as a flush cuts
    a burst), costs a transaction per full batch and one for the three short ones: not
    two per shard, which taking the batches in their order would cost (a shard's short
    batch first, beside which the next shard's full batch no longer fits)."""
    store, batches = counting(n_shards=3, per_shard=127 + 34)
    assert [len(b.ops) for b in batches] == [127, 34] * 3
    gens = {"a": store.read_fences("a", ["nodes-0"])["nodes-0"]}
    store.reads = 0
    outcomes: Counter[str] = Counter()
    assert apply_all(store, batches, outcomes, gap_wait=0.0, gens=gens) == []
    assert store.commits == [True] * 4
    assert store.reads == 0
    assert outcomes["applied"] == 6
    for shard in ("nodes-0", "nodes-1", "nodes-2"):
        last = [b for b in batches if b.shard == shard][-1]
        assert store.read_fence("a", shard).fence == FenceRecord(1, last.pos)
    assert sum(1 for k in store.data if k.startswith(b"cilium/cache/nodes/v1/a/")) == 3 * 161


def test_a_short_batch_before_a_full_one_of_its_shard_lands_first() -> None:
    """Full batches go first only among what the fences admit: a shard whose chain is a
    short batch and then a full one gets them in that order, each in a transaction of its
    own beside another shard's full batch (three transactions for 290 operations)."""
    store, full = counting(n_shards=2, per_shard=127)
    a = next(b for b in full if b.shard == "nodes-0")
    short, rest = (
        a.ops[:34],
        a.ops[34:] + tuple(Operation(Op.PUT, k, b"w") for k in node_keys("nodes-0", 2, 161)[127:]),
    )
    first = Batch("a", "b", "nodes-0", 1, (10, 0), (20, 0), short)
    second = Batch("a", "b", "nodes-0", 1, (20, 0), (30, 0), rest)
    other = next(b for b in full if b.shard == "nodes-1")
    gens = {"a": store.read_fences("a", ["nodes-0"])["nodes-0"]}
    store.reads = 0
    outcomes: Counter[str] = Counter()
    assert apply_all(store, [first, second, other], outcomes, gap_wait=0.0, gens=gens) == []
    assert store.commits == [True] * 3  # no guess failed: each came after its predecessor
    assert store.reads == 0
    assert outcomes["applied"] == 3
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (30, 0))
    assert sum(1 for k in store.data if k.startswith(b"cilium/cache/nodes/v1/a/")) == 161 + 127


def test_a_landed_batch_delivered_again_is_a_duplicate_not_a_wait() -> None:
    """A task delivered again after its short batch landed: the full one that follows it
    is chosen first, and the short one is refused as a duplicate in the same pass, not
    taken for a batch waiting on its shard (no gap recorded for it)."""
    store, batches = counting(n_shards=1, per_shard=127 + 34)
    full, short = batches
    second = Batch("a", "b", "nodes-0", 1, short.pos, (short.pos[0] + 1, 0), full.ops)
    gens: dict[str, FenceView] = {}
    assert apply_all(store, [full, short], Counter(), gap_wait=0.0, gens=gens) == []
    store.reads, store.commits = 0, []
    outcomes: Counter[str] = Counter()
    gaps: dict[tuple[str, str, str], object] = {}
    assert apply_all(store, [short, second], outcomes, gap_wait=0.0, gaps=gaps, gens=gens) == []
    assert gaps == {}
    assert outcomes[Decision.DUPLICATE.value] == 1 and outcomes["applied"] == 1
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, second.pos)


def test_a_wrong_guess_costs_one_failed_transaction_and_no_read() -> None:
    """The predecessor's record is not what the batch expects (here: a snapshot not done):
    the failed compare brings the fences back, and the batch lands on them at once."""
    store, batches = counting(n_shards=1, per_shard=3)
    store.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0), done=False).encode())
    gens = {"a": store.read_fences("a", ["nodes-0"])["nodes-0"]}
    store.reads = 0
    outcomes: Counter[str] = Counter()
    assert apply_all(store, batches, outcomes, gap_wait=0.0, gens=gens) == []
    assert store.reads == 0
    assert store.commits == [False, True]
    assert outcomes["applied"] == 1
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, batches[0].pos)


def test_a_stale_generation_is_never_acted_on() -> None:
    """The process remembers generation 1; the watcher has since opened generation 2. A
    batch of generation 1 is obsolete and writes nothing; one of generation 2 (which the
    stale memory would call a resync) lands after a read."""
    store, batches = counting(n_shards=1, per_shard=3)
    old = batches[0]
    remembered = store.read_fences("a", ["nodes-0"])["nodes-0"]
    store.put(gen_key("a"), GenRecord(2, 1, "id", 7).encode())
    store.put(fence_key("a", "nodes-0"), FenceRecord(2, (20, 0)).encode())
    gens = {"a": remembered}
    store.reads = 0
    outcomes: Counter[str] = Counter()
    assert apply_all(store, [old], outcomes, gap_wait=0.0, gens=gens) == []
    assert outcomes == Counter(obsolete=1)
    assert not any(k.startswith(b"cilium/cache/") for k in store.data)
    assert store.commits == [False]  # the guess failed; the read back showed generation 2
    # the same stale memory, and a batch of the new generation: generation 1 would make
    # it a resync, which is not decided on memory; a read finds generation 2
    gens = {"a": remembered}
    store.reads, store.commits = 0, []
    new = Batch("a", "b", "nodes-0", 2, (20, 0), (21, 0), old.ops)
    assert apply_all(store, [new], outcomes, gap_wait=0.0, gens=gens) == []
    assert outcomes["applied"] == 1 and outcomes["resync"] == 0
    assert store.reads == 1 and store.commits == [True]
    assert gens["a"].gen == 2
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(2, (21, 0))


def test_a_batch_waiting_for_its_predecessor_guesses_once_then_reads() -> None:
    """A failed transaction that would have written goes through etcd's log: a batch that
    waits looks at its fence with reads after its one guess."""
    store, batches = counting(n_shards=1, per_shard=3 * 127)
    gens = {"a": store.read_fences("a", ["nodes-0"])["nodes-0"]}
    store.reads = 0
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    outcomes: Counter[str] = Counter()
    waiting = apply_all(
        store, [batches[2]], outcomes, gap_wait=0.05, clock=lambda: now[0], sleep=sleep, gens=gens
    )
    assert waiting == [batches[2]]
    assert store.commits == [False]
    assert store.reads >= 2  # it looked again, with reads


def test_a_slow_target_lengthens_the_wait_for_a_predecessor() -> None:
    """The wait a batch gets in place for its predecessor (gap_window, which the task
    passes to apply_all as its gap_wait) is as long as a predecessor's task of transactions
    takes on the target: gap_wait while transactions are quick, longer while they are slow
    (a loaded target), up to a cap. The time is this process's own transactions, averaged;
    reads and failed calls do not count. (That apply_all hands a batch back after gap_wait
    without a moving fence, and keeps waiting while it moves, are tests further up.)"""
    now = [0.0]

    class Slow(Store):
        took = 0.05

        def commit_group(self, source, gen_rev, parts, read_back=()):  # type: ignore[no-untyped-def]
            now[0] += Slow.took
            return super().commit_group(source, gen_rev, parts, read_back)

        def read_fences(self, source, shards):  # type: ignore[no-untyped-def]
            now[0] += 1.0
            return super().read_fences(source, shards)

    slow, batches = setup(n_shards=1, per_shard=4 * 127)
    assert len(batches) == 4
    inner = Slow()
    inner.etcd.space = slow.etcd.space
    store = TimedStore(inner, WorkerMetrics(CollectorRegistry()), "b", clock=lambda: now[0])
    assert store.txn_seconds == 0.0 and gap_window(0.1, store.txn_seconds, 15.0) == 0.1
    assert apply_all(store, batches[:1], Counter(), gap_wait=0.0) == []
    assert store.txn_seconds == pytest.approx(0.05)  # the read before it took 1 s: not counted
    assert gap_window(0.1, store.txn_seconds, 15.0) == pytest.approx(TXNS_PER_TASK * 0.05)
    Slow.took = 0.15
    assert apply_all(store, batches[1:2], Counter(), gap_wait=0.0) == []
    assert store.txn_seconds == pytest.approx(0.8 * 0.05 + 0.2 * 0.15)
    Slow.took = 0.001
    for b in batches[2:]:
        assert apply_all(store, [b], Counter(), gap_wait=0.0) == []
    assert store.txn_seconds == pytest.approx(0.64 * 0.07 + 0.36 * 0.001)  # decays
    settled = store.txn_seconds
    inner.etcd.space.down = True  # the target stops answering: a failed call, not a time
    with pytest.raises(RetryableError):
        store.commit_group("a", 1, [])
    assert store.txn_seconds == settled
    assert gap_window(0.1, 0.01, 15.0) == 0.1  # quick transactions: gap_wait itself
    # a target that answers in 10 s (an etcd timeout) holds a slot for the cap at most
    assert gap_window(0.1, 10.0, 2.5) == 2.5
    assert gap_window(0.1, 10.0, 0.01) == 0.1  # and gap_wait is the least, whatever the cap
