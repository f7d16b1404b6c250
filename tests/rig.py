"""A real Watcher and the real batch applier on in-memory etcds, joined by an in-memory
queue: the whole sync path of one source, run step by step in the test's own thread.

    rig = Rig()                     # source a, targets b and c
    rig.source.put(b"cilium/state/nodes/v1/a/n1", b"{}")
    rig.start()                     # first sync: list, diff, publish
    rig.settle()                    # pump watches, flush, apply, tick until nothing moves
    assert rig.cache("b") == rig.expected()

Nothing here sleeps: the clock is the rig's, watches deliver when pumped, and workers apply
when told. A test decides the order, including the bad ones (a lost task, a duplicate, a
wiped target, a compacted source).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import wait
from typing import Any

from pipeline.clients.publisher import group_batches
from pipeline.config import Settings, settings_from_mapping
from pipeline.protocol.errors import BadInputError, PublishError, QueueFullError
from pipeline.protocol.fence import Decision
from pipeline.protocol.wire import Batch
from pipeline.source.listing import read_source, read_target
from pipeline.source.metrics import WatcherMetrics
from pipeline.source.watcher import Watcher
from tests.memory_etcd import MemoryEtcd, MemoryMesh
from workers.applier import apply_batch, apply_group
from workers.store import EtcdTargetStore, FenceView


def _batch_id(b: Batch) -> tuple[object, ...]:
    return (b.source, b.target, b.shard, b.gen, b.pos)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings_for(
    clusters: Sequence[str], sources: Iterable[str] | None = None, **sync: Any
) -> Settings:
    """Settings of a mesh of in-memory clusters (ids 1, 2, ...), every one a source and a
    target unless *sources* says which are sources."""
    srcs = set(clusters if sources is None else sources)
    return settings_from_mapping(
        {
            "broker": {"url": "redis://127.0.0.1:1/0", "insecure_unsigned": True},
            "sync": {"shards": 4, "drain_grace": 0.0, **sync},
            "clusters": [
                {
                    "name": n,
                    "id": i + 1,
                    "endpoints": [f"http://127.0.0.1:{20000 + i}"],
                    "source": n in srcs,
                }
                for i, n in enumerate(clusters)
            ],
        },
        {},
        keys=False,
    )


class Queue:
    """The source's Celery queue: batches in publish order, with a broker that can fail."""

    def __init__(self, per_task: int) -> None:
        self.per_task = per_task  # sync.batches_per_task, for a publish that names none
        self.batches: list[Batch] = []
        self.seen: list[Batch] = []  # every batch ever published, in order
        self.failing = False
        self.published = 0
        self.flushes = 0  # calls of publish: one per flush of the watcher
        self.tasks: list[list[Batch]] = []  # the batches as the publisher cuts them into tasks
        # the shards of the tracked tasks a worker holds, as a test sets them (busy_shards)
        self.busy: set[str] = set()
        self.tracked: list[bool] = []  # each publish: whether it asked to track its tasks
        self._busy: set[str] = set()  # what the last look found of them
        self.looks = 0  # looks at the queue (backlog)
        self._bytes_looked = self._bytes_since = 0  # see queued_bytes

    def publish(
        self,
        batches: Sequence[Batch],
        per_task: int = 0,
        txn_ops: int = 0,
        budget: int | None = None,
        track: bool = False,
    ) -> None:
        if self.failing:
            raise PublishError("broker down", 0)
        self.flushes += 1
        self.tracked.append(track)
        sent = spent = 0
        for task in group_batches(batches, per_task or self.per_task, txn_ops=txn_ops):
            if budget is not None and sent and spent >= budget:
                raise QueueFullError("the queue holds its bytes", sent)
            self.tasks.append(task)
            self.batches.extend(task)
            self.seen.extend(task)
            self.published += len(task)
            sent += len(task)
            spent += sum(b.size for b in task)
            self._bytes_since += sum(b.size for b in task)

    def backlog(self, among: Collection[str] = ()) -> int:
        self._bytes_looked, self._bytes_since = self.bytes(), 0
        self.looks += 1
        self._busy = self.busy & set(among)
        return len(self.batches)

    def tracks(self, among: Collection[str]) -> bool:
        return bool(self.tracked) and self.tracked[-1]

    def busy_shards(self) -> set[str]:
        return self._busy

    def queued_bytes(self) -> int:
        """As a RedisPublisher tells it: what the queue held at the last backlog(), and
        what was published since."""
        return self._bytes_looked + self._bytes_since

    def bytes(self) -> int:
        """What the queue holds now."""
        return sum(b.size for b in self.batches)


class Rig:
    def __init__(
        self,
        clusters: Sequence[str] = ("a", "b", "c"),
        source: str = "a",
        **sync: Any,
    ) -> None:
        self.mesh = MemoryMesh(*clusters)
        self.settings = settings_for(clusters, [source], **sync)
        self.source_name = source
        self.source: MemoryEtcd = self.mesh[source]
        self.clock = Clock()
        self.queue = Queue(self.settings.sync.batches_per_task)
        self.outcomes: Counter[str] = Counter()
        self.held: list[Batch] = []  # batches a worker waits on (their predecessor is missing)
        self.gap_since: dict[tuple[object, ...], float] = {}
        self.group = True  # workers apply what they can of a task in one transaction
        # each source's generation per target, as a worker process keeps it across tasks:
        # with it, apply_group guesses fences instead of reading them (and a wipe or a new
        # generation makes the guesses stale, which the compares must catch)
        self.gens: dict[str, dict[str, FenceView]] = {}
        self._ticks = itertools.count()  # milliseconds the wall clock moved on its own
        self.watcher = self.new_watcher()

    def new_watcher(self) -> Watcher:
        """A watcher of the source, as a freshly started process would build it."""
        return Watcher(
            self.settings,
            self.settings.cluster(self.source_name),
            self.queue,
            metrics=WatcherMetrics(),
            clock=self.clock,
            etcd=self.mesh.factory,
            # the fake clock stands still between steps, a wall clock does not: each reading
            # is a millisecond past the one before (a generation is floored by it, and two
            # opens with a wipe between them are never in the same millisecond)
            wall_ms=lambda: int(self.clock() * 1000) + next(self._ticks),
            # nobody drains a superseded watcher's inbox: it must not block
            inbox=1_000_000,
            inbox_bytes=1 << 40,
            watched=lambda _source: False,  # no other watcher runs
        )

    @property
    def targets(self) -> list[str]:
        return [c.name for c in self.settings.targets_of(self.source_name)]

    def metric(self, name: str, **labels: str) -> float:
        value = self.watcher.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def resyncs(self, target: str, reason: str | None = None) -> float:
        """Resyncs of *target* so far, for one reason or all of them."""
        total = 0.0
        for family in self.watcher.metrics.registry.collect():
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "kvmesh_watcher_resyncs_total"
                    and labels.get("target_cluster") == target
                    and (reason is None or labels.get("reason") == reason)
                ):
                    total += sample.value
        return total

    # -- moving things along ----------------------------------------------------------------

    def start(self, watcher: Watcher | None = None) -> None:
        (watcher or self.watcher).start()

    def step(self, watcher: Watcher | None = None) -> None:
        """Deliver what the watches owe, and let the watcher take it and publish it."""
        w = watcher or self.watcher
        self.mesh.pump()
        w.step(max_wait=0)
        w.flush()

    def tick(self, seconds: float | None = None, watcher: Watcher | None = None) -> None:
        """Let time pass (a fence poll interval, by default) and run the fence poll."""
        w = watcher or self.watcher
        self.clock.advance(self.settings.sync.fence_poll_interval if seconds is None else seconds)
        self.mesh.pump()  # the progress requests of the poll are answered
        w.step(max_wait=0)
        w.tick()

    def work(self, batches: list[Batch] | None = None) -> list[Decision]:
        """A worker applies every batch in the queue (or *batches*) and those it holds, in
        order, passing over those whose predecessor has not landed until nothing more lands.
        What still waits is held, as Celery holds a retried task (out of the queue), and
        given up with a resync request once it has waited sync.stall_timeout. Returns the
        decisions, in the order taken."""
        if batches is None:
            batches, self.queue.batches = self.queue.batches, []
        pending = self.held + list(batches)
        self.held = []
        decisions: list[Decision] = []
        if self.group:  # as a worker does first with a task's batches for each target
            for target in sorted({b.target for b in pending}):
                store = EtcdTargetStore(MemoryEtcd(self.mesh[target].space))
                landed, rest = apply_group(
                    store,
                    [b for b in pending if b.target == target],
                    gens=self.gens.setdefault(target, {}),
                )
                pending = [b for b in pending if b.target != target] + rest
                decisions += [Decision.APPLY] * len(landed)
                self.outcomes["applied"] += len(landed)
        while pending:
            waiting = []
            for b in pending:
                d = self.apply(b)
                if d is Decision.GAP:
                    waiting.append(b)
                else:
                    self.gap_since.pop(_batch_id(b), None)
                    decisions.append(d)
            if len(waiting) == len(pending):
                break
            pending = waiting
        for b in pending:
            since = self.gap_since.setdefault(_batch_id(b), self.clock())
            if self.clock() - since < self.settings.sync.stall_timeout:
                self.held.append(b)
                continue
            self.gap_since.pop(_batch_id(b), None)
            self.outcomes["stalled"] += 1
            store = EtcdTargetStore(MemoryEtcd(self.mesh[b.target].space))
            store.request_resync(b.source, b.gen, f"shard {b.shard} stalled")
        return decisions

    def apply(self, batch: Batch) -> Decision:
        """One batch, as a worker takes it: a RESYNC decision writes a resync request."""
        store = EtcdTargetStore(MemoryEtcd(self.mesh[batch.target].space))
        decision = apply_batch(store, batch)
        self.outcomes[decision.value] += 1
        if decision is Decision.RESYNC:
            store.request_resync(batch.source, batch.gen, "the target lost its records")
        return decision

    def settle(self, rounds: int = 20, watcher: Watcher | None = None) -> int:
        """Step, work and tick until a round moves nothing; returns the rounds it took."""
        for i in range(rounds):
            before = (self.queue.published, self.total_writes())
            self.step(watcher)
            self.work()
            self.tick(watcher=watcher)
            self.work()
            if (
                (self.queue.published, self.total_writes()) == before
                and not self.queue.batches
                and not self.held
                and not self.reads_over(watcher)
            ):
                return i
        raise AssertionError(f"still moving after {rounds} rounds")

    def reads_over(self, watcher: Watcher | None = None, patience: float = 5.0) -> bool:
        """Wait until the reads under way of targets whose last read failed are over: the
        fence poll does not wait for them (the next poll takes them up), as it waits a
        while for the others. True if one was under way and ended; False if none was
        under way, or none ended within *patience* seconds (a test's read that hangs)."""
        w = watcher or self.watcher
        under_way = [t.reading for t in w.targets if t.reading is not None and t.poll_backoff]
        if not under_way:
            return False
        done, _ = wait(under_way, timeout=patience)
        return bool(done)

    def total_writes(self) -> int:
        return sum(c.space.revision for c in self.mesh.clusters.values())

    # -- what is where ----------------------------------------------------------------------

    def expected(self) -> dict[bytes, bytes]:
        """What every target must cache of the source: its synced keys, rewritten."""
        rejected: list[BadInputError] = []
        state = read_source(
            MemoryEtcd(self.source.space),
            self.settings.layout_of(self.settings.cluster(self.source_name)),
            page=100,
            max_bytes=self.settings.sync.max_batch_bytes,
            on_reject=rejected.append,
        )
        return state.items

    def cache(self, target: str) -> dict[bytes, bytes]:
        return read_target(MemoryEtcd(self.mesh[target].space), self.source_name, page=100)
