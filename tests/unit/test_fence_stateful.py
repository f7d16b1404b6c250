"""The fence protocol under Celery's delivery, with the real watcher and the real applier:
tasks duplicated, reordered, lost and late, watchers taking over from each other while the
superseded ones still publish, a wiped target, a compacted source and resync requests.

Hypothesis drives the rig of tests/rig.py (real Watcher objects and the real batch applier,
on in-memory etcds): it picks the source's changes, which watcher moves, which task is
delivered, duplicated or lost, and when time passes. Invariants hold after every step; at
the end, the newest watcher alone (the one a lease would leave running) must bring the
target to the source's exact state through its own recovery paths (stall detection, the
workers' resync requests), and the superseded watchers' late tasks must change nothing.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.protocol.fence import Decision, FenceRecord
from pipeline.protocol.sharding import all_shards
from pipeline.source.feed import Lost
from pipeline.source.watcher import Watcher
from tests.memory_etcd import MemoryEtcd
from tests.rig import Rig
from workers.store import EtcdTargetStore

SRC, TGT = "a", "t"
NODES = b"cilium/state/nodes/v1/a/"
KEYS = [NODES + b"n%d" % i for i in range(10)]
STALL = 5.0


class WatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(
            clusters=(SRC, TGT), source=SRC, shards=3, max_batch_ops=3, stall_timeout=STALL
        )
        self.shards = all_shards(3)
        self.watchers: list[Watcher] = [self.rig.watcher]
        self.rig.start()
        self.fence_seen: dict[str, tuple[int, tuple[int, int]]] = {}
        self.applied: dict[bytes, int] = {}  # cache key -> source revision of what landed

    @property
    def store(self) -> EtcdTargetStore:
        return EtcdTargetStore(MemoryEtcd(self.rig.mesh[TGT].space))

    # -- the source ----------------------------------------------------------------------------

    @rule(k=st.sampled_from(KEYS), delete=st.booleans(), value=st.binary(max_size=8))
    def source_change(self, k: bytes, delete: bool, value: bytes) -> None:
        if delete:
            self.rig.source.delete(k)
        else:
            self.rig.source.put(k, value)

    @rule()
    def compact_source(self) -> None:
        self.rig.source.compact()

    # -- the watchers ------------------------------------------------------------------------

    @rule(w=st.integers(0, 2))
    def publish(self, w: int) -> None:
        """A watcher takes what its watches delivered and publishes it, nothing else (a
        superseded one, about to learn it lost its lease, does just that)."""
        watcher = self.watchers[w % len(self.watchers)]
        self.rig.mesh.pump()
        for item in watcher.feed.next(0, 512):
            if isinstance(item, Lost):  # the source compacted past its watch
                watcher._restart_all(item.cause, item.detail)
                return
            watcher.ingest(item)
        watcher.flush()

    @rule(w=st.integers(0, 2), seconds=st.sampled_from([0.5, 1.0, STALL + 1]))
    def tick(self, w: int, seconds: float) -> None:
        """Time passes and a watcher runs its loop and fence poll: it may resync, answer a
        request, or take the generation back from a newer watcher."""
        self.rig.tick(seconds, watcher=self.watchers[w % len(self.watchers)])

    @precondition(lambda self: len(self.watchers) < 3)
    @rule()
    def takeover(self) -> None:
        """A new watcher starts (a lease taken over); the old ones keep running for a while."""
        watcher = self.rig.new_watcher()
        self.watchers.append(watcher)
        self.rig.start(watcher)

    # -- the queue ---------------------------------------------------------------------------

    @precondition(lambda self: self.rig.queue.batches)
    @rule(i=st.integers(0, 10**6), keep=st.booleans())
    def deliver(self, i: int, keep: bool) -> None:
        """A worker takes any queued task; keep=True leaves a copy behind (a redelivery)."""
        queue = self.rig.queue.batches
        batch = queue[i % len(queue)]
        if not keep:
            queue.remove(batch)
        before = self.store.read_fence(SRC, batch.shard)
        decision = self.rig.apply(batch)
        if decision is Decision.APPLY:
            assert batch.gen == before.gen, "a batch of another generation landed"
            assert before.fence is not None and batch.prev == before.fence.pos, "out of order"
            for op in batch.ops:
                # the cache never moves backwards: what lands is never older than what was there
                assert batch.pos[0] >= self.applied.get(op.key, 0)
                self.applied[op.key] = batch.pos[0]
        elif decision is Decision.GAP and not keep:
            self.rig.held.append(batch)  # the worker holds it and tries again

    @rule()
    def work(self) -> None:
        """The pool drains the queue (and what it holds), as far as the fences admit."""
        self.rig.work()

    @precondition(lambda self: self.rig.queue.batches)
    @rule(i=st.integers(0, 10**6))
    def lose(self, i: int) -> None:
        """A task vanishes (a Redis restart)."""
        self.rig.queue.batches.pop(i % len(self.rig.queue.batches))

    @rule()
    def wipe_target(self) -> None:
        """The target etcd comes back empty: its cache and kvmesh records are gone."""
        self.rig.mesh[TGT].wipe()
        self.fence_seen.clear()
        self.applied.clear()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def fences_never_move_backwards(self) -> None:
        for s in self.shards:
            view = self.store.read_fence(SRC, s)
            fence: FenceRecord | None = view.fence
            if fence is None:
                continue
            key = (fence.gen, fence.pos)
            prev = self.fence_seen.get(s)
            if prev is not None:
                assert key[0] >= prev[0], "a generation went backwards"
                if prev[0] == key[0]:
                    assert key[1] >= prev[1], "a fence went backwards"
            self.fence_seen[s] = key

    # -- convergence -------------------------------------------------------------------------

    def teardown(self) -> None:
        """The newest watcher is left alone (the others lost the lease): through its own
        recovery it converges on the source's exact state, and whatever the others still
        publish afterwards changes nothing."""
        survivor = self.watchers[-1]
        self.rig.watcher = survivor
        for _ in range(40):
            self.rig.step(survivor)
            self.rig.work()
            self.rig.tick(STALL / 2, watcher=survivor)
            self.rig.work()
            if (
                not self.rig.queue.batches
                and not self.rig.held
                and self.rig.cache(TGT) == self.rig.expected()
                and all(not t.need_resync for t in survivor.targets)
            ):
                break
        assert self.rig.cache(TGT) == self.rig.expected()
        for old in self.watchers[:-1]:
            self.publish(self.watchers.index(old))
        self.rig.work()
        assert self.rig.cache(TGT) == self.rig.expected()
        for w in self.watchers:
            w.feed.stop()


TestFenceProtocol = WatcherMachine.TestCase
TestFenceProtocol.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_two_watchers_do_not_share_a_generation_after_a_wipe() -> None:
    """A case the machine found while the rig's wall clock stood still between steps: a
    superseded watcher opens a generation, the target is wiped, and the newest opens one at
    the same clock reading, so with the same number (each is floored by the clock). The old
    watcher's last batch and the new one's first then had the same positions, the new one
    (the only one carrying n7) was refused as a copy, and the target never got n7. A wall
    clock moves between two opens with a wipe between them; the rig's now does too."""
    m = WatcherMachine()
    m.takeover()
    m.takeover()
    m.source_change(k=KEYS[2], delete=False, value=b"")
    m.source_change(k=KEYS[7], delete=False, value=b"")
    m.tick(w=1, seconds=0.5)
    m.work()
    m.source_change(k=KEYS[2], delete=True, value=b"")
    m.tick(w=0, seconds=0.5)
    m.wipe_target()
    m.teardown()  # asserts the target converges on the source
