"""The fence protocol under Celery's delivery: batches duplicated, reordered, lost and late,
generation bumps racing in-flight batches, two watchers, a wiped target and resync requests.

Model watchers (built from the same pure pieces as the real one: the shard buffer, the batch
cutter, the fence and generation records and the snapshot diff) publish into an unordered
"network"; the real batch applier takes messages out in any order against an in-memory
target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
SHARD_NAMES = [f"identities-{i}" for i in range(SHARDS)]


def shard(key: bytes) -> str:
    return shard_of(RES, key, SHARDS)


@dataclass
class ModelWatcher:
    buffer: ShardBuffer = field(default_factory=ShardBuffer)
    gen: int = 0
    chain: dict[str, Position] = field(default_factory=dict)


class FenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryTargetStore()
        self.source: dict[bytes, bytes] = {}
        self.rev = 1
        self.network: list[Batch] = []
        self.watchers = [ModelWatcher(), ModelWatcher()]
        self.applied_rev: dict[bytes, int] = {}  # key -> source revision of what landed
        self.fence_seen: dict[str, tuple[int, Position]] = {}
        self.lost = False  # a message vanished, or the target was wiped, since the last resync
        self.clock = 0
        self.resync(0)

    # -- the model watchers -----------------------------------------------------------------

    @rule(k=st.sampled_from(KEYS), delete=st.booleans())
    def source_change(self, k: bytes, delete: bool) -> None:
        self.rev += 1
        if delete:
            self.source.pop(k, None)
            change = Change(k, Op.DELETE, None, (self.rev, 0))
        else:
            self.source[k] = f"v{self.rev}".encode()
            change = Change(k, Op.PUT, self.source[k], (self.rev, 0))
        for w in self.watchers:  # both watch the same source
            w.buffer.add(shard(k), change)

    @rule(w=st.integers(0, 1), max_ops=st.integers(1, 4))
    def flush(self, w: int, max_ops: int) -> None:
        watcher = self.watchers[w]
        if not watcher.gen:
            watcher.buffer.drain()
            return
        for shard_name, changes in watcher.buffer.drain().items():
            batches = make_batches(
                source=SRC,
                target="t",
                shard=shard_name,
                gen=watcher.gen,
                prev=watcher.chain[shard_name],
                changes=changes,
                max_ops=max_ops,
                max_bytes=10**6,
            )
            self.network.extend(batches)
            watcher.chain[shard_name] = batches[-1].pos

    @rule(w=st.integers(0, 1))
    def resync(self, w: int) -> None:
        """Watcher w opens a generation (a takeover, a resync, anti-entropy): bump, diff the
        target against the source at R, publish the diff. Old batches stay in flight."""
        watcher = self.watchers[w]
        view = self.store.read_fence(SRC, SHARD_NAMES[0])
        self.clock += 1  # generations never repeat, even after the target forgot them
        watcher.gen = max((view.gen or 0) + 1, watcher.gen + 1, self.clock)
        self.store.put(gen_key(SRC), GenRecord(watcher.gen, SHARDS, "id", 1).encode())
        self.lost = False
        R = self.rev
        watcher.buffer.drain()  # covered by the snapshot
        actual = {k: v for k, (v, _) in self.store.data.items() if k.startswith(PREFIX)}
        d = diff(dict(self.source), actual)
        per: dict[str, list[Change]] = {s: [] for s in SHARD_NAMES}
        todo = [(k, Op.PUT, v) for k, v in {**d.missing, **d.different}.items()]
        todo += [(k, Op.DELETE, None) for k in d.extra]
        for k, op, v in todo:
            per[shard(k)].append(Change(k, op, v, (R, len(per[shard(k)]) + 1)))
        for s in SHARD_NAMES:
            self.store.put(fence_key(SRC, s), FenceRecord(watcher.gen, (R, 0), not per[s]).encode())
            watcher.chain[s] = (R, 0)
            if per[s]:
                batches = make_batches(
                    source=SRC,
                    target="t",
                    shard=s,
                    gen=watcher.gen,
                    prev=(R, 0),
                    changes=per[s],
                    max_ops=2,
                    max_bytes=10**6,
                    snapshot=True,
                )
                self.network.extend(batches)
                watcher.chain[s] = batches[-1].pos

    @precondition(lambda self: self.store.resync_requests)
    @rule(w=st.integers(0, 1))
    def answer_resync_request(self, w: int) -> None:
        """A worker asked for a resync (the target lost its records): a watcher answers."""
        self.store.resync_requests.clear()
        self.resync(w)

    @rule()
    def wipe_target(self) -> None:
        """The target etcd comes back empty: its cache and kvmesh records are gone."""
        self.store.data.clear()
        self.applied_rev.clear()
        self.fence_seen.clear()
        self.lost = True

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
        elif decision is Decision.RESYNC:
            self.store.request_resync(SRC, batch.gen, "target lost its records")

    @precondition(lambda self: self.network)
    @rule(i=st.integers(0, 10**6))
    def lose(self, i: int) -> None:
        """A message vanishes (a Redis restart)."""
        self.network.pop(i % len(self.network))
        self.lost = True

    @invariant()
    def fences_never_move_backwards(self) -> None:
        for s in SHARD_NAMES:
            view = self.store.read_fence(SRC, s)
            if view.fence is None:
                continue
            key = (view.fence.gen, view.fence.pos)
            prev = self.fence_seen.get(s)
            if prev is not None:
                assert key[0] >= prev[0], "a generation went backwards"
                if prev[0] == key[0]:
                    assert key[1] >= prev[1]
            self.fence_seen[s] = key

    # -- convergence --------------------------------------------------------------------------

    def _drain(self) -> None:
        progress = True
        while self.network and progress:
            progress = False
            for batch in list(self.network):
                self.network.remove(batch)
                if apply_batch(self.store, batch) is Decision.GAP:
                    self.network.append(batch)
                else:
                    progress = True

    def _cache(self) -> dict[bytes, bytes]:
        return {k: v for k, (v, _) in self.store.data.items() if k.startswith(PREFIX)}

    def teardown(self) -> None:
        """With nothing lost, the current watcher's delivery alone converges; after a resync
        it always does, whatever the other watcher still has in flight."""
        current = max(range(2), key=lambda i: self.watchers[i].gen)
        assert self.watchers[0].gen != self.watchers[1].gen
        self.flush(current, 4)
        if (
            not self.lost
            and self.watchers[current].gen == self.store.read_fence(SRC, SHARD_NAMES[0]).gen
        ):
            self._drain()
            assert self._cache() == self.source
        self.resync(0)
        self.flush(1, 4)  # the superseded watcher's late batches must change nothing
        self.flush(0, 4)
        self._drain()
        assert self._cache() == self.source
        assert not self.network  # the superseded watcher's batches were all dropped


TestFenceProtocol = FenceMachine.TestCase
TestFenceProtocol.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
