"""The fence protocol under Celery's delivery: batches duplicated, reordered, lost and late.

A model watcher (built from the same pure pieces as the real one: the shard buffer, the batch
cutter, the fence records and the snapshot diff) publishes into an unordered "network"; the
real batch applier takes messages out in any order against an in-memory target.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.batching import Change, ShardBuffer, make_batches
from pipeline.fence import Decision, FenceRecord, GenRecord, Position
from pipeline.layout import RESOURCE_BY_NAME, Op, fence_key, gen_key
from pipeline.sharding import shard_of
from pipeline.snapshot import diff
from pipeline.store import MemoryTargetStore
from pipeline.wire import Batch
from workers.applier import apply_batch

SRC = "a"
RES = RESOURCE_BY_NAME["identities"]
SHARDS = 3
PREFIX = b"cilium/cache/identities/v1/a/id/"
KEYS = [PREFIX + str(i).encode() for i in range(12)]


class FenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryTargetStore()
        self.source: dict[bytes, bytes] = {}
        self.rev = 1
        self.buffer = ShardBuffer()
        self.network: list[Batch] = []
        self.gen = 0
        self.chain: dict[str, Position] = {}
        self.shards = [f"identities-{i}" for i in range(SHARDS)]
        self.applied_rev: dict[bytes, int] = {}  # key -> source revision of what landed
        self.fence_seen: dict[str, tuple[int, Position]] = {}
        self.lost = False
        self.resync()

    # -- the model watcher ------------------------------------------------------------------

    def _shard(self, key: bytes) -> str:
        return shard_of(RES, key, SHARDS)

    @rule(k=st.sampled_from(KEYS), delete=st.booleans())
    def source_change(self, k: bytes, delete: bool) -> None:
        self.rev += 1
        if delete:
            self.source.pop(k, None)
            change = Change(k, Op.DELETE, None, (self.rev, 0))
        else:
            self.source[k] = f"v{self.rev}".encode()
            change = Change(k, Op.PUT, self.source[k], (self.rev, 0))
        self.buffer.add(self._shard(k), change)

    @rule(max_ops=st.integers(1, 4))
    def flush(self, max_ops: int) -> None:
        for shard, changes in self.buffer.drain().items():
            batches = make_batches(
                source=SRC,
                target="t",
                shard=shard,
                gen=self.gen,
                prev=self.chain[shard],
                changes=changes,
                max_ops=max_ops,
                max_bytes=10**6,
            )
            self.network.extend(batches)
            self.chain[shard] = batches[-1].pos

    @rule()
    def resync(self) -> None:
        """Bump the generation, diff the target against the source at R, publish the diff."""
        self.lost = False
        self.gen += 1
        self.store.put(gen_key(SRC), GenRecord(self.gen, SHARDS, "id", 1).encode())
        R = self.rev
        self.buffer.drain()  # covered by the snapshot
        actual = {k: v for k, (v, _) in self.store.data.items() if k.startswith(PREFIX)}
        d = diff(dict(self.source), actual)
        per: dict[str, list[Change]] = {s: [] for s in self.shards}
        for k, v in {**d.missing, **d.different}.items():
            per[self._shard(k)].append(Change(k, Op.PUT, v, (R, len(per[self._shard(k)]) + 1)))
        for k in d.extra:
            per[self._shard(k)].append(
                Change(k, Op.DELETE, None, (R, len(per[self._shard(k)]) + 1))
            )
        for s in self.shards:
            self.store.put(fence_key(SRC, s), FenceRecord(self.gen, (R, 0), not per[s]).encode())
            self.chain[s] = (R, 0)
            if per[s]:
                batches = make_batches(
                    source=SRC,
                    target="t",
                    shard=s,
                    gen=self.gen,
                    prev=(R, 0),
                    changes=per[s],
                    max_ops=2,
                    max_bytes=10**6,
                    snapshot=True,
                )
                self.network.extend(batches)
                self.chain[s] = batches[-1].pos

    # -- the network --------------------------------------------------------------------------

    @precondition(lambda self: self.network)
    @rule(i=st.integers(0, 10**6), keep=st.booleans())
    def deliver(self, i: int, keep: bool) -> None:
        """Deliver any in-flight message; keep=True leaves a copy behind (a redelivery)."""
        batch = self.network[i % len(self.network)]
        if not keep:
            self.network.remove(batch)
        before = self.store.read_fence(SRC, batch.shard)
        decision = apply_batch(self.store, batch)
        if decision is Decision.APPLY:
            assert batch.gen == before.gen, "a batch of another generation landed"
            assert before.fence is not None and batch.prev == before.fence.pos, "out of order"
            for op in batch.ops:
                # the target never moves backwards: what lands is never older than what was there
                assert batch.pos[0] >= self.applied_rev.get(op.key, 0)
                self.applied_rev[op.key] = batch.pos[0]
        elif decision is Decision.GAP and not keep:
            self.network.append(batch)  # Celery's retry puts it back

    @precondition(lambda self: self.network)
    @rule(i=st.integers(0, 10**6))
    def lose(self, i: int) -> None:
        """A message vanishes (a Redis restart)."""
        self.network.pop(i % len(self.network))
        self.lost = True

    @invariant()
    def fences_never_move_backwards(self) -> None:
        for s in self.shards:
            view = self.store.read_fence(SRC, s)
            if view.fence is None:
                continue
            key = (view.fence.gen, view.fence.pos)
            prev = self.fence_seen.get(s)
            if prev is not None and prev[0] == key[0]:
                assert key[1] >= prev[1]
            self.fence_seen[s] = key

    def _drain(self) -> None:
        progress = True
        while self.network and progress:
            progress = False
            for batch in list(self.network):
                self.network.remove(batch)
                d = apply_batch(self.store, batch)
                if d is Decision.GAP:
                    self.network.append(batch)
                else:
                    progress = True

    def _cache(self) -> dict[bytes, bytes]:
        return {k: v for k, (v, _) in self.store.data.items() if k.startswith(PREFIX)}

    def teardown(self) -> None:
        """With nothing lost, delivery alone converges; after a resync, it always does."""
        self.flush(4)
        if not self.lost:
            self._drain()
            assert self._cache() == self.source
        self.resync()
        self._drain()
        assert self._cache() == self.source
        assert not self.network


TestFenceProtocol = FenceMachine.TestCase
TestFenceProtocol.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
