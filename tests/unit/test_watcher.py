"""The real watcher, its parts and the real applier on in-memory etcds (tests/rig.py): the
paths that the integration and fault suites cover with processes, here one step at a time."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import pytest

from pipeline.clients.etcd import ModIs, Put
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.fence import Decision, GenRecord
from pipeline.protocol.layout import RESOURCE_BY_NAME, canary_key
from pipeline.protocol.names import draining_key, gen_key, progress_key
from pipeline.protocol.wire import Batch
from pipeline.source import watcher as watcher_module
from pipeline.source.drain import drain_removed
from pipeline.source.feed import Delivered, FeedItem, SourceFeed
from pipeline.source.planner import Cause
from tests.harness import eventually
from tests.memory_etcd import MemoryEtcd
from tests.rig import Rig

NODE = b"cilium/state/nodes/v1/a/"
IDENTITY = b"cilium/state/identities/v1/id/"
VALUE = b"cilium/state/identities/v1/value/"
CONFIG = b"cilium/cluster-config/a"


def fill(rig: Rig, nodes: int = 20, identities: int = 30) -> None:
    src = rig.source
    for i in range(nodes):
        src.put(NODE + f"node-{i}".encode(), b'{"name": "node-%d"}' % i)
    for i in range(identities):
        ident = (1 << 16) + 100 + i  # cluster ID 1
        src.put(IDENTITY + str(ident).encode(), b"k8s:app=x%d" % i)
        src.put(VALUE + b"k8s:app=x%d/10.0.0.%d" % (i, i), str(ident).encode())
    src.put(CONFIG, b'{"id":1,"capabilities":{"maxConnectedClusters":255}}')


def test_first_sync_copies_what_is_synced_and_nothing_else() -> None:
    rig = Rig()
    fill(rig)
    before = rig.source.revision()
    rig.start()
    rig.settle()
    expected = rig.expected()
    assert len(expected) == 20 + 30 + 1  # nodes, identity IDs, the cluster config
    assert not any(b"/value/" in k for k in expected)
    for target in rig.targets:
        assert rig.cache(target) == expected
        assert (
            rig.metric(
                "kvmesh_watcher_initial_sync_completed", source_cluster="a", target_cluster=target
            )
            == 1
        )
        canary = rig.mesh[target].get(b"cilium/synced/a/cilium/cache/nodes/v1")
        assert canary is not None
    assert rig.source.revision() == before  # the source was only read


def test_live_changes_follow_and_deletes_land() -> None:
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.source.put(NODE + b"node-new", b"{}")
    rig.source.delete(NODE + b"node-0")
    rig.source.delete_prefix(IDENTITY)
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
    assert rig.resyncs("b") == 1  # the live path, not a resync, carried them


def test_live_batches_carry_their_event_time_and_kvstoremesh_gauges_follow() -> None:
    """Batches of watch events carry when the watcher received them (the workers' lag
    histogram runs from there); snapshot batches carry none. KVStoreMesh's readiness and
    per-scope gauges say what landed."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    assert rig.queue.seen and all(b.event_ms == 0 for b in rig.queue.seen)
    before, n = int(time.time() * 1000), len(rig.queue.seen)
    rig.source.put(NODE + b"node-new", b"{}")
    rig.settle()
    live = rig.queue.seen[n:]
    assert live and all(before <= b.event_ms <= time.time() * 1000 for b in live)
    pair = {"source_cluster": "a", "target_cluster": "b"}
    assert rig.metric("kvmesh_remote_cluster_readiness_status", **pair) == 1
    for action in ("read", "write"):
        labels = {"scope": "nodes/v1", "source_cluster": "a", "action": action}
        assert rig.metric("kvmesh_kvstore_initial_sync_completed", **labels) == 1
    assert rig.metric("kvmesh_kvstore_sync_queue_size", scope="nodes/v1", source_cluster="a") == 0


def test_a_new_term_resumes_from_the_fences_and_misses_nothing() -> None:
    """A watcher that starts over a target it synced before resumes where the fences say,
    including what changed while no watcher ran, without listing the source."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.watcher.close()
    rig.source.put(NODE + b"while-down", b"{}")
    rig.source.delete(NODE + b"node-1")
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert (
            rig.metric("kvmesh_watcher_resumes_total", source_cluster="a", target_cluster=target)
            == 1
        )
        assert rig.resyncs(target) == 0  # the new term listed nothing


def test_a_flush_lists_its_shards_in_one_fixed_order() -> None:
    """Each target's batches of a flush go out by shard number, whatever order the changes
    came in: the publisher packs consecutive batches into tasks, so a flush's task of
    shards 0-1 waits only for the task of the flush before that held shards 0-1, not for
    every task of it (bursts of all-shard flushes chained from task to task)."""
    rig = Rig(shards=12)  # two-digit numbers: an order by name would put 10 before 2
    fill(rig, nodes=0, identities=0)
    rig.start()
    rig.settle()
    for flush in range(3):
        n = len(rig.queue.seen)
        ids = [(1 << 16) + 1000 + flush * 100 + i for i in range(90)]
        rig.source.txn([], [Put(IDENTITY + str(i).encode(), b"k8s:app=x") for i in ids[::-1]])
        rig.settle()
        for target in ("b", "c"):
            shards = [int(b.shard.split("-")[1]) for b in rig.queue.seen[n:] if b.target == target]
            assert len(shards) == 12
            assert shards == sorted(shards)


def one_flush(count: int) -> list[list[Batch]]:
    """The tasks of one flush of *count* new identities, cut as the publisher cuts them,
    for the two targets of a 16-shard rig."""
    rig = Rig(shards=16)
    fill(rig, nodes=0, identities=0)
    rig.start()
    rig.settle()
    n = len(rig.queue.tasks)
    ids = [(1 << 16) + 1000 + i for i in range(count)]
    for i in range(0, count, 100):  # etcd takes at most 128 operations per transaction
        puts = [Put(IDENTITY + str(n).encode(), b"k8s:app=x") for n in ids[i : i + 100]]
        rig.source.txn([], puts)
    rig.step()
    tasks = rig.queue.tasks[n:]
    assert sum(len(b.ops) for t in tasks for b in t) == 2 * count  # both targets, one flush
    return tasks


def test_a_flush_of_many_shards_becomes_tasks_of_one_transaction_each() -> None:
    """A burst's first flushes touch nearly every shard: the watcher has the publisher cut
    each into tasks of what one transaction holds per target (operations and a fence per
    shard), on disjoint shards, which the pool applies side by side."""
    tasks = one_flush(400)
    for target in ("b", "c"):
        parts = [[b for b in t if b.target == target] for t in tasks]
        parts = [p for p in parts if p]
        assert 4 <= len(parts) <= 5  # 400 operations over 16 shards: 4 or 5 transactions
        for p in parts:
            assert len({b.shard for b in p}) == len(p)
            assert sum(len(b.ops) + 1 for b in p) <= 128
        shards = [b.shard for p in parts for b in p]
        assert len(shards) == len(set(shards)) == 16


def test_a_small_flush_for_several_targets_is_one_task_of_one_transaction_each() -> None:
    """A flush whose share for each target fits one transaction stays one task of whole
    targets: one transaction per target, however many shards it touches."""
    tasks = one_flush(40)
    assert len(tasks) == 1
    for target in ("b", "c"):
        mine = [b for b in tasks[0] if b.target == target]
        assert sum(len(b.ops) for b in mine) == 40 and len(mine) > 8


def test_progress_is_not_pinned_by_a_quiet_shard_with_a_batch_in_flight() -> None:
    """The progress record (the resume point, and what status reports as lag) moves up to
    the first change still in flight, not to the last fence of its shard, which may be
    much older: under steady churn some shard always has a batch in flight."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    identity = IDENTITY + str((1 << 16) + 100).encode()
    rig.source.put(identity, b"k8s:app=first")
    fence_rev = rig.source.revision()
    rig.settle()  # the identity shard's fence stops here
    for i in range(5):  # another shard moves on and lands, between two fence polls
        rig.source.put(NODE + b"node-0", b'{"v": %d}' % i)
        rig.step()
        rig.work()
    landed_rev = rig.source.revision()
    rig.source.put(identity, b"k8s:app=second")
    rig.step()
    assert rig.queue.batches  # in flight, not applied
    rig.tick()
    for target in rig.targets:
        kv = rig.mesh[target].get(progress_key("a"))
        assert kv is not None
        # past that fence (a quiet resource's watch reports progress once per poll, so
        # not always up to the change in flight), and never past the change in flight
        assert fence_rev < json.loads(kv.value)["rev"] <= landed_rev
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_wiped_target_asks_for_a_resync_and_gets_one() -> None:
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.mesh["b"].wipe()
    rig.source.put(NODE + b"after-wipe", b"{}")
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert rig.cache("c") == rig.expected()
    wiped = rig.metric(
        "kvmesh_watcher_resyncs_total",
        source_cluster="a",
        target_cluster="b",
        reason=Cause.TARGET_WIPED.value,
    )
    requested = rig.metric(
        "kvmesh_watcher_resyncs_total",
        source_cluster="a",
        target_cluster="b",
        reason=Cause.REQUESTED.value,
    )
    assert wiped + requested == 1


def test_a_lost_task_is_found_by_the_stall_check() -> None:
    rig = Rig(stall_timeout=3.0)
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.source.put(NODE + b"lost", b"{}")
    rig.source.put(NODE + b"next", b"{}")
    rig.step()
    lost = [b for b in rig.queue.batches if b.target == "b"]
    assert lost
    rig.queue.batches = [b for b in rig.queue.batches if b.target != "b"]  # a Redis restart
    for _ in range(6):  # 6 s: past the stall timeout
        rig.tick(1.0)
        rig.work()
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert (
        rig.metric(
            "kvmesh_watcher_resyncs_total",
            source_cluster="a",
            target_cluster="b",
            reason=Cause.STALLED.value,
        )
        == 1
    )


def test_duplicated_and_reordered_tasks_change_nothing() -> None:
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    for i in range(30):
        rig.source.put(NODE + b"node-%d" % (i % 7), b"v%d" % i)
    rig.step()
    batches = list(rig.queue.batches)
    rig.queue.batches = []
    decisions = rig.work(batches[::-1] + batches)
    assert Decision.APPLY in decisions and Decision.DUPLICATE in decisions
    rig.settle()
    assert rig.cache("b") == rig.expected()


def test_a_refused_cluster_config_is_a_gauge_not_only_a_rejected_key() -> None:
    """A source whose cluster config kvmesh refuses (here its id, then its
    maxConnectedClusters, disagree with the mesh config) keeps syncing everything else, and
    kvmesh_watcher_source_config_refused says so while it lasts: at a term's start, and as
    the config changes."""
    rig = Rig()
    fill(rig, nodes=3, identities=0)
    rig.source.put(CONFIG, b'{"id":7}')
    rig.start()
    rig.settle()

    def refused() -> float:
        return rig.metric("kvmesh_watcher_source_config_refused", source_cluster="a")

    assert refused() == 1
    assert CONFIG not in rig.cache("b") and rig.cache("b") == rig.expected()
    rig.watcher._stepped_down()  # a standby says nothing of it
    assert refused() == 0
    # a new term that resumes, converting nothing, finds it refused too
    rig.watcher.close()
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    assert rig.resyncs("b") == 0 and refused() == 1
    for value, expected in (
        (b'{"id":1}', 0),
        (b'{"id":1,"capabilities":{"maxConnectedClusters":511}}', 1),
        (None, 0),
    ):
        if value is None:
            rig.source.delete(CONFIG)
        else:
            rig.source.put(CONFIG, value)
        rig.settle()
        assert refused() == expected, value
        assert rig.cache("b") == rig.expected()


def test_a_compacted_source_resyncs_every_target() -> None:
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.watcher.feed.stop()  # the watch breaks while the source compacts past it
    for i in range(5):
        rig.source.put(NODE + b"churn-%d" % i, b"{}")
    rig.source.compact()
    rig.watcher.feed.start(rig.watcher.feed.delivered_through() + 1)
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert (
            rig.metric(
                "kvmesh_watcher_resyncs_total",
                source_cluster="a",
                target_cluster=target,
                reason=Cause.COMPACTED.value,
            )
            == 1
        )


def test_bad_input_is_counted_and_the_rest_syncs() -> None:
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.source.put(IDENTITY + b"007", b"x")  # not canonical
    rig.source.put(IDENTITY + str(5 << 16).encode(), b"x")  # another cluster's scope
    rig.source.put(b"cilium/state/nodes/v1/a/\xff\xfe", b"{}")  # not UTF-8: still bytes
    rig.start()
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert b"cilium/cache/nodes/v1/a/\xff\xfe" in rig.cache("b")
    assert rig.metric("kvmesh_watcher_rejected_total", source_cluster="a", reason="layout") == 2
    rig.source.put(CONFIG, b"not json")  # the cached config must not stay at the old one
    rig.settle()
    assert CONFIG not in rig.cache("b")
    assert rig.cache("b") == rig.expected()


def test_a_config_change_read_while_the_source_fails_costs_a_resync_not_the_watcher() -> None:
    """A cluster config that changes what is synced makes the watcher read what the source
    advertises; if the source fails right then, the watcher goes on (an error there ended
    it, and every other source's watcher with it) and owes every target a resync, which
    reads it again once the source answers."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    export = b"cilium/state/serviceexports/v1/a/default/web"
    rig.source.put(export, b"{}")  # synced once the config enables service exports
    rig.start()
    rig.settle()
    assert b"cilium/cache/serviceexports/v1/a/default/web" not in rig.cache("b")
    rig.source.put(CONFIG, b'{"id":1,"capabilities":{"serviceExportsEnabled":true}}')
    rig.mesh.pump()  # the change reaches the feed
    rig.source.space.down = True
    rig.watcher.step(max_wait=0)  # ingests it: the read of the source fails
    assert all(t.need_resync is Cause.SOURCE_CONFIG for t in rig.watcher.targets)
    rig.source.space.down = False
    rig.settle()
    assert all(rig.resyncs(t, "source_config") == 1 for t in rig.targets)
    assert rig.cache("b") == rig.expected()
    assert b"cilium/cache/serviceexports/v1/a/default/web" in rig.cache("b")


def test_a_broker_outage_pauses_publishing_and_loses_nothing() -> None:
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    rig.queue.failing = True
    for i in range(10):
        rig.source.put(NODE + b"during-%d" % i, b"{}")
        rig.step()
        rig.clock.advance(1.0)
    assert (
        rig.metric("kvmesh_watcher_publish_paused_total", source_cluster="a", reason="broker_error")
        >= 1
    )
    rig.queue.failing = False
    rig.clock.advance(20.0)
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert rig.resyncs(target) == 1  # the first sync's only: nothing was lost


def _resume_and_see_one_outbox_resync(rig: Rig) -> None:
    """The broker answers again: each target was resynced once for what it held while
    publishing was paused, and the caches end exact."""
    rig.queue.failing = False
    rig.clock.advance(20.0)
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert rig.resyncs(target, "outbox_full") == 1


def test_an_outbox_past_its_bound_while_paused_becomes_a_resync() -> None:
    """While publishing is paused each target's outbox coalesces what comes, one change per
    key touched, deletes of keys created meanwhile included: past sync.max_held_changes it is
    dropped and the target resynced, from a snapshot of the keys that exist. The caches
    end exact."""
    rig = Rig(max_held_changes=20)
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    rig.queue.failing = True
    for i in range(40):  # created and deleted again: 40 deletes to coalesce
        rig.source.put(NODE + b"passing-%d" % i, b"{}")
        rig.source.delete(NODE + b"passing-%d" % i)
        rig.step()
        rig.clock.advance(0.2)
        for t in rig.watcher.targets:  # in the outbox, and cut but not published
            assert t.held()[0] <= 20
    paused = rig.metric(
        "kvmesh_watcher_publish_paused_total", source_cluster="a", reason="broker_error"
    )
    assert paused >= 1
    _resume_and_see_one_outbox_resync(rig)


def test_large_values_held_while_paused_are_bounded_in_bytes() -> None:
    """A source of large values fills a target's outbox in bytes long before it does in
    number: past sync.max_held_bytes of keys and values held while publishing is paused,
    they are dropped and the target resynced. The caches end exact."""
    limit = 1_500_000
    rig = Rig(max_held_bytes=limit)
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    rig.queue.failing = True
    big = b'{"name":"' + b"n" * 200_000 + b'"}'
    for i in range(12):  # 2.4 MB in all, 12 changes: far under sync.max_held_changes
        rig.source.put(NODE + b"large-%d" % i, big)
        rig.step()
        rig.clock.advance(0.2)
        for t in rig.watcher.targets:  # in the outbox, and cut but not published
            assert t.held()[1] <= limit
    _resume_and_see_one_outbox_resync(rig)


BIG = b'{"name":"' + b"n" * 200_000 + b'"}'  # a node of 200 KB
QUEUE_LIMIT = 1_500_000  # the least sync.max_queue_bytes


def _largest_task(rig: Rig) -> int:
    return max(sum(b.size for b in task) for task in rig.queue.tasks)


def _drain_and_see_no_resync(rig: Rig) -> None:
    """The workers take what waits and the pause runs out: the caches end exact, with no
    resync but the first sync's (nothing was dropped)."""
    rig.work()
    rig.clock.advance(20.0)
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert rig.resyncs(target) == 1


def test_large_values_pause_publishing_at_the_queues_bytes() -> None:
    """A source of large values fills Redis in bytes long before its queue holds
    sync.max_queue_depth tasks: once the tasks waiting in its queue hold
    sync.max_queue_bytes, its watcher stops publishing (queue_full) and keeps the changes,
    coalesced, until the workers have taken enough."""
    rig = Rig(max_queue_bytes=QUEUE_LIMIT)
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    for i in range(12):  # 2.4 MB for each of the two targets, the workers away
        rig.source.put(NODE + b"large-%d" % i, BIG)
        rig.step()
        rig.clock.advance(0.2)
        assert rig.queue.bytes() < QUEUE_LIMIT + _largest_task(rig)
    assert rig.queue.bytes() >= QUEUE_LIMIT
    paused = rig.metric(
        "kvmesh_watcher_publish_paused_total", source_cluster="a", reason="queue_full"
    )
    assert paused >= 1
    assert rig.metric("kvmesh_watcher_queue_bytes", source_cluster="a") >= QUEUE_LIMIT
    _drain_and_see_no_resync(rig)


def test_one_large_flush_stops_at_the_queues_bytes() -> None:
    """A flush larger than the room left in the queue publishes until it is full, and a
    task more: the rest waits, as after a broker's refusal, and goes once there is room."""
    rig = Rig(max_queue_bytes=QUEUE_LIMIT)
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    value = b'{"name":"' + b"n" * 20_000 + b'"}'
    for i in range(300):
        rig.source.put(NODE + b"mid-%d" % i, value)
    rig.step()  # one flush of 12 MB, in tasks of a transaction's worth for each target
    assert QUEUE_LIMIT <= rig.queue.bytes() < QUEUE_LIMIT + _largest_task(rig)
    assert any(t.unsent for t in rig.watcher.targets)
    paused = rig.metric(
        "kvmesh_watcher_publish_paused_total", source_cluster="a", reason="queue_full"
    )
    assert paused == 1
    _drain_and_see_no_resync(rig)


def test_a_snapshot_waits_for_room_in_the_queue() -> None:
    """A resync publishes every key that differs, for every target: it fills the queue up
    to sync.max_queue_bytes, and a task more, then waits for the workers instead of
    filling Redis."""
    rig = Rig(max_queue_bytes=QUEUE_LIMIT)
    fill(rig, nodes=3, identities=3)
    for i in range(12):  # 2.4 MB for each of the two targets' first sync
        rig.source.put(NODE + b"large-%d" % i, BIG)
    held: list[int] = []

    def workers_run(seconds: float) -> bool:
        """The wait: note what the queue holds, let the workers take it and time pass."""
        held.append(rig.queue.bytes())
        rig.work()
        rig.clock.advance(seconds)
        return False

    rig.watcher._room_wait = workers_run
    rig.start()
    assert held, "the snapshot never waited"
    assert max(held) < QUEUE_LIMIT + _largest_task(rig)
    paused = rig.metric(
        "kvmesh_watcher_publish_paused_total", source_cluster="a", reason="queue_full"
    )
    assert paused >= 1
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
        assert rig.resyncs(target) == 1


def test_a_long_wait_for_room_is_no_silence_of_the_watch() -> None:
    """While a resync's snapshot waits for the workers, the loop asks the watch's streams
    nothing; once it goes on, the answers that came meanwhile count, and no stream is
    taken for cut off (which would count a source failure and replace every stream)."""
    from pipeline.source.planner import Cause

    rig = Rig(max_queue_bytes=QUEUE_LIMIT)
    fill(rig, nodes=3, identities=3)
    for i in range(12):
        rig.source.put(NODE + b"large-%d" % i, BIG)
    away = [0.1]  # how long each wait takes

    def workers_run(seconds: float) -> bool:
        rig.work()
        rig.clock.advance(away[0])
        return False

    rig.watcher._room_wait = workers_run
    rig.start()  # the first sync waits too, briefly
    rig.settle()
    away[0] = 30.0  # now each look comes after longer than sync.watch_timeout
    for t in rig.watcher.targets:
        t.need_resync = None
        t.owe(Cause.ANTI_ENTROPY)  # every large value again, for each target
    for target in rig.targets:  # the caches lost them: the snapshot carries them again
        for i in range(12):
            rig.mesh[target].delete(b"cilium/cache/nodes/v1/a/large-%d" % i)
    failures = rig.metric("kvmesh_watcher_source_failures_total", source_cluster="a")
    rig.tick()  # the fence poll starts the resync, which waits
    assert rig.metric(
        "kvmesh_watcher_publish_paused_total", source_cluster="a", reason="queue_full"
    )
    rig.tick(0.0)  # the next poll asks the streams how far they are
    assert rig.metric("kvmesh_watcher_source_failures_total", source_cluster="a") == failures
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_snapshot_waits_for_room_in_tasks_too() -> None:
    """A snapshot into a queue holding sync.max_queue_depth tasks waits for the workers as
    well, whatever their bytes."""
    rig = Rig(max_queue_depth=3)
    fill(rig, nodes=400, identities=3)  # more than a publish of each target's snapshot
    depths: list[int] = []

    def workers_run(seconds: float) -> bool:
        depths.append(len(rig.queue.batches))
        rig.work()
        rig.clock.advance(seconds)
        return False

    rig.watcher._room_wait = workers_run
    rig.start()
    assert depths and min(depths) >= 3
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_snapshot_that_waits_stops_with_the_watcher() -> None:
    """A snapshot waiting for room ends when the watcher stops: the target stays owed its
    resync."""
    rig = Rig(max_queue_bytes=QUEUE_LIMIT)
    fill(rig, nodes=3, identities=3)
    for i in range(12):
        rig.source.put(NODE + b"large-%d" % i, BIG)
    rig.watcher._room_wait = lambda seconds: True  # stopped
    rig.start()
    assert all(t.need_resync for t in rig.watcher.targets)


@pytest.mark.parametrize("restart", [False, True])
def test_an_unreachable_target_does_not_hold_up_the_others(restart: bool) -> None:
    """A target down as the watcher starts is resynced once it answers, and holds up no
    other: at a first start, and at a new watcher's (a restart, a standby), which resumes
    the others from their fences while the one down owes a resync nobody can start yet."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    if restart:
        rig.start()
        rig.settle()
        rig.watcher = rig.new_watcher()
    rig.mesh["c"].set_down(True)
    rig.start()
    rig.source.put(NODE + b"after", b"{}")
    rig.settle()
    assert rig.cache("b") == rig.expected()
    rig.mesh["c"].set_down(False)
    rig.clock.advance(120.0)  # past the resync backoff
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_the_targets_records_are_read_side_by_side() -> None:
    """The fence poll reads every target's records at once, not one after another: a
    target that does not answer (its packets dropped) would otherwise hold up the poll of
    every other pair for a sync.etcd_timeout each. Here each read waits for the other."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    met = threading.Barrier(len(rig.targets), timeout=10)
    reads: list[str] = []
    for t in rig.watcher.targets:

        def read(control: Any = t.control, original: Any = t.control.read) -> Any:
            met.wait()  # BrokenBarrierError, a failed poll, if the other read is not under way
            reads.append(control.name)
            return original()

        t.control.read = read  # type: ignore[method-assign]
    rig.tick()
    assert reads and reads.count("b") == reads.count("c") == len(reads) / 2
    assert rig.metric("kvmesh_watcher_errors_total", source_cluster="a", where="fence_poll") == 0
    assert all(t.need_resync is None for t in rig.watcher.targets)


def test_a_read_that_hangs_holds_up_neither_the_loop_nor_the_other_target() -> None:
    """A target's read that does not come back (its packets dropped: the call lasts
    sync.etcd_timeout) is begun once and left under way: the polls that follow go on with
    the other target, and the one that comes after the read is over takes its records up."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    reads: dict[str, int] = {name: 0 for name in rig.targets}
    release = threading.Event()
    for t in rig.watcher.targets:

        def read(control: Any = t.control, original: Any = t.control.read) -> Any:
            reads[control.name] += 1
            if control.name == "c":
                release.wait(10)
            return original()

        t.control.read = read  # type: ignore[method-assign]
    c = next(t for t in rig.watcher.targets if t.name == "c")
    try:
        for _ in range(5):
            rig.tick()
        assert reads["c"] == 1 and reads["b"] >= 5
        assert c.reading is not None and not c.reading.done()
    finally:
        release.set()
    eventually(lambda: c.reading is not None and c.reading.done(), what="c's read over")
    rig.watcher.tick()  # one poll: it takes the records up
    assert c.reading is None and reads["c"] == 1
    assert c.poll_backoff == 0.0 and c.need_resync is None
    rig.watcher.tick()  # and the next reads them again
    assert reads["c"] == 2
    rig.source.put(NODE + b"after", b"{}")
    rig.settle()
    assert rig.cache("c") == rig.expected()


def settled_with_c() -> tuple[Rig, Any]:
    """A rig synced once, and its target c."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    return rig, next(t for t in rig.watcher.targets if t.name == "c")


def test_a_progress_write_that_hangs_holds_up_neither_the_loop_nor_the_other_target() -> None:
    """A poll decides on a target's progress record, and the target's next read writes it
    first, on a poller thread: a target that goes silent right after a read that answered
    (each call then lasting sync.etcd_timeout) costs the loop no call, and the other
    target keeps syncing. The poll that takes the read up learns the record was written."""
    rig, c = settled_with_c()
    before = c.progress_rev
    original = c.control.write_progress
    release = threading.Event()
    writes = 0

    def hang(*args: Any) -> bool:
        nonlocal writes
        writes += 1
        if not release.wait(20):  # as a call to a target that drops packets ends
            raise RetryableError("etcd c: deadline exceeded")
        return original(*args)

    c.control.write_progress = hang  # type: ignore[method-assign]
    try:
        rig.source.put(NODE + b"after", b"{}")
        rig.settle()
        assert rig.cache("b") == rig.expected()
        eventually(lambda: writes == 1, what="c's write under way")
        assert c.reading is not None and not c.reading.done()
        assert c.progress_rev == before
    finally:
        release.set()
    c.control.write_progress = original  # type: ignore[method-assign]
    eventually(lambda: c.reading is not None and c.reading.done(), what="c's write and read")
    rig.tick()
    assert c.progress_rev > before and c.need_resync is None
    record = rig.mesh["c"].get(progress_key("a"))
    assert record is not None and json.loads(record.value)["rev"] == c.progress_rev


def test_a_terms_exit_record_lands_after_the_progress_write_under_way() -> None:
    """A term that ends while a target's read is still writing the progress record its
    last poll decided on writes its exit record after that one, so the older record never
    lands last (the next term would then find fences past what it vouches for)."""
    rig, c = settled_with_c()
    original = c.control.write_progress
    release = threading.Event()
    begun: list[str] = []
    landed: list[str] = []

    def write(*args: Any) -> bool:
        what = "exit" if begun else "poll"
        begun.append(what)
        if what == "poll":
            assert release.wait(20)
        written = original(*args)
        landed.append(what)
        return bool(written)

    c.control.write_progress = write  # type: ignore[method-assign]
    rig.source.put(NODE + b"after", b"{}")
    rig.settle()
    eventually(lambda: begun == ["poll"], what="the poll's write under way")
    ending = threading.Thread(target=rig.watcher._record_on_exit)
    ending.start()
    release.set()
    ending.join(30)
    assert not ending.is_alive()
    assert landed == ["poll", "exit"]


def test_a_target_owed_a_resync_that_hangs_holds_up_neither_the_loop_nor_the_other() -> None:
    """A target owed a resync is read on a poller thread first, and resynced only once that
    read has come back: one that drops packets (each call lasting sync.etcd_timeout) costs
    the loop no call of its own, however often its resync is tried, and the other target
    keeps syncing. Once it answers, its resync goes at the next poll."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    c = next(t for t in rig.watcher.targets if t.name == "c")
    original = c.control.read
    reads = 0
    release = threading.Event()

    def read() -> Any:
        nonlocal reads
        reads += 1
        release.wait(10)
        return original()

    c.control.read = read  # type: ignore[method-assign]
    c.owe(Cause.REQUESTED, "a test")
    try:
        for _ in range(5):
            rig.tick()
        # one read begun and left under way: no call to it on the loop
        assert reads == 1 and c.reading is not None and not c.reading.done()
        assert c.need_resync is Cause.REQUESTED
        rig.source.put(NODE + b"meanwhile", b"{}")
        rig.settle()
        assert rig.cache("b") == rig.expected()
        assert c.need_resync is Cause.REQUESTED and reads == 1
    finally:
        release.set()
    c.control.read = original  # type: ignore[method-assign]
    eventually(lambda: c.reading is not None and c.reading.done(), what="c's read over")
    rig.tick()  # the read came back: the resync goes
    assert c.need_resync is None
    assert rig.resyncs("c", Cause.REQUESTED.value) == 1
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_target_that_fails_at_the_start_is_not_called_again_until_it_answers() -> None:
    """A target that fails as the watcher starts is owed a resync, and the start does not
    try it again at once (a call to one that drops packets waits sync.etcd_timeout); a
    failed read before its resync spaces the tries as a failed poll does, and the first
    read that comes back lets the resync go."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    c = next(t for t in rig.watcher.targets if t.name == "c")
    calls = 0
    ensure_loaded = c.control.leases.ensure_loaded

    def counted(wait: float | None = None) -> None:
        nonlocal calls
        calls += 1
        ensure_loaded(wait)

    c.control.leases.ensure_loaded = counted  # type: ignore[method-assign]
    rig.mesh["c"].set_down(True)
    rig.start()
    # its records, read side by side with b's, did not come back: nothing more is asked
    assert calls == 0 and c.need_resync is not None
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert c.need_resync is not None and c.poll_backoff > 0
    assert calls == 0  # no resync begun while its reads fail
    rig.mesh["c"].set_down(False)
    rig.tick(30.0)  # past the longest wait between reads: one begins
    assert rig.reads_over()
    rig.tick()  # and the next poll takes it up: it answered, and the resync goes
    assert c.need_resync is None and calls == 1
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_target_that_hangs_at_the_start_holds_up_neither_the_start_nor_the_other() -> None:
    """A term's start reads every target's records side by side and, once one has answered,
    waits a grace for the rest, not sync.etcd_timeout: a target that drops packets is left
    with its read under way, owed a resync, while the other target syncs. When its read
    comes back, the fence poll takes it up and the resync goes."""
    rig = Rig(etcd_timeout=3600.0)  # a start that waited for the read would wait for release
    fill(rig, nodes=3, identities=3)
    c = next(t for t in rig.watcher.targets if t.name == "c")
    original = c.control.read
    release = threading.Event()

    def hang() -> Any:
        if not release.wait(20):  # as a call to a target that drops packets ends
            raise RetryableError("etcd c: deadline exceeded")
        return original()

    c.control.read = hang  # type: ignore[method-assign]
    try:
        rig.start()
        assert c.need_resync is not None  # its first resync, still owed
        assert c.reading is not None and not c.reading.done()
        rig.settle()
        assert rig.cache("b") == rig.expected()
    finally:
        release.set()
    c.control.read = original  # type: ignore[method-assign]
    eventually(lambda: c.reading is not None and c.reading.done(), what="c's read over")
    rig.tick(1.0)  # the poll takes the read up: it answered, and the resync goes
    assert c.need_resync is None and rig.resyncs("c") == 1
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_start_tried_again_waits_for_a_silent_targets_read_instead_of_another() -> None:
    """A term's start that is tried again (the source failed it) while a target's read of
    the first try is still under way waits for that read again: reads of a target that
    drops packets do not pile up on the poller threads, one per try."""
    rig = Rig(etcd_timeout=3600.0)
    fill(rig, nodes=3, identities=3)
    c = next(t for t in rig.watcher.targets if t.name == "c")
    original = c.control.read
    release = threading.Event()
    reads = 0

    def hang() -> Any:
        nonlocal reads
        reads += 1
        if not release.wait(20):
            raise RetryableError("etcd c: deadline exceeded")
        return original()

    c.control.read = hang  # type: ignore[method-assign]
    try:
        rig.start()
        first = c.reading
        rig.start()  # as _serve tries it again, in the same term
        assert reads == 1 and c.reading is first and first is not None
        assert c.need_resync is not None
    finally:
        release.set()
    c.control.read = original  # type: ignore[method-assign]
    rig.settle()
    assert rig.cache("c") == rig.expected()


def drain_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The targets the watcher's drain checks look at from now on, in order (nothing is
    drained)."""
    drained: list[str] = []
    monkeypatch.setattr(
        watcher_module, "drain_removed", lambda _client, name, *_a, **_k: drained.append(name)
    )
    return drained


def test_the_drain_check_leaves_out_a_target_owed_a_resync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A target down as the watcher starts is owed a resync it cannot get yet, and is never
    polled: the drain check leaves it out too (each call to it could hold the loop up for
    a sync.etcd_timeout), and takes it up once it is synced again."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.mesh["c"].set_down(True)
    rig.start()
    rig.settle()
    drained = drain_checks(monkeypatch)
    rig.watcher._next_drain = 0.0
    rig.watcher.tick()
    assert "b" in drained and "c" not in drained
    rig.mesh["c"].set_down(False)
    rig.clock.advance(120.0)  # past the resync backoff
    rig.settle()
    assert rig.cache("c") == rig.expected()
    drained.clear()
    rig.watcher._next_drain = 0.0
    rig.watcher.tick()
    assert "b" in drained and "c" in drained


def test_a_canary_goes_only_into_the_generation_whose_fences_said_so() -> None:
    """The canary is written under a compare of the generation record: a target wiped, or
    given another generation, since its fences were read does not get it."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    b = next(t for t in rig.watcher.targets if t.name == "b")
    nodes = RESOURCE_BY_NAME["nodes"]
    key = canary_key("a", nodes)
    before = rig.mesh["b"].get(key)
    assert before is not None
    assert not b.control.write_canary(nodes, b.gen_rev - 1)
    assert rig.mesh["b"].get(key) == before
    assert b.control.write_canary(nodes, b.gen_rev)
    after = rig.mesh["b"].get(key)
    assert after is not None and after.mod_revision > before.mod_revision


def hold_first_read(c: Any) -> tuple[threading.Event, list[Any]]:
    """Make target *c*'s next read of its records wait (as a read of a target that drops
    packets does) until the event returned is set; the list counts its reads."""
    release = threading.Event()
    original = c.control.read
    reads: list[Any] = []

    def read() -> Any:
        records = original()  # the records as they were
        reads.append(records)
        if len(reads) == 1:
            release.wait(10)
        return records

    c.control.read = read
    return release, reads


def a_read_under_way() -> tuple[Rig, Any, threading.Event, list[Any]]:
    """A settled rig whose target c has a read of its records, begun by a poll, held under
    way until the event returned is set; and c, and the list of c's reads."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    c = next(t for t in rig.watcher.targets if t.name == "c")
    release, reads = hold_first_read(c)
    rig.watcher.tick()  # begins the read, which stays under way
    assert c.reading is not None
    return rig, c, release, reads


def test_a_read_under_way_holds_a_resync_back_until_it_comes_back() -> None:
    """A target whose read is under way when it is owed a resync is not resynced meanwhile
    (it may be dropping packets: each call of the resync would wait sync.etcd_timeout on
    the loop). That read began before the target was owed, so it says nothing of whether
    the target answers now, and is not taken for a poll either: once it is back, the next
    poll reads the target again, and that read lets the resync go."""
    rig, c, release, reads = a_read_under_way()
    gen = c.pair.gen
    c.owe(Cause.REQUESTED, "a test")
    rig.clock.advance(120.0)
    rig.watcher.tick()
    assert c.need_resync is Cause.REQUESTED and c.pair.gen == gen and len(reads) == 1
    release.set()
    eventually(lambda: c.reading is not None and c.reading.done(), what="the read over")
    rig.watcher.tick()  # takes the read up, and drops it
    assert c.reading is None and c.need_resync is Cause.REQUESTED and c.pair.gen == gen
    rig.watcher.tick()  # reads again: it answers, and the resync goes
    assert c.need_resync is None and c.pair.gen != gen
    assert rig.resyncs("c", Cause.REQUESTED.value) == 1
    assert rig.resyncs("c", Cause.GENERATION_MOVED.value) == 0
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_read_begun_while_due_lets_the_resync_go_whatever_another_target_did() -> None:
    """A target owed a resync whose read began while its resync was due is resynced once
    that read comes back, even if another target's resync failed meanwhile and pushed the
    resyncs' backoff on: a target on a slow link is not starved by a broken one."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    b = next(t for t in rig.watcher.targets if t.name == "b")
    c = next(t for t in rig.watcher.targets if t.name == "c")
    release, _ = hold_first_read(c)

    def refuse(*_args: Any) -> int:
        raise RetryableError("etcd b: refused for a test", "b")

    b.control.open_generation = refuse  # type: ignore[method-assign]
    b.owe(Cause.REQUESTED, "a test")
    c.owe(Cause.REQUESTED, "a test")
    rig.clock.advance(120.0)
    rig.watcher.tick()  # c's read stays under way; b answers, and its resync fails
    assert c.reading is not None and b.need_resync is not None
    assert rig.watcher._resync_after > rig.clock()  # the resyncs back off
    release.set()
    eventually(lambda: c.reading is not None and c.reading.done(), what="c's read over")
    rig.watcher.tick()  # c's read, begun while due, came back: its resync goes
    assert c.need_resync is None and b.need_resync is not None
    assert rig.resyncs("c", Cause.REQUESTED.value) == 1


def test_a_read_of_the_term_before_says_nothing_of_the_new_one() -> None:
    """A read that was under way when a new term of the watcher began says nothing of the
    target now: the new term's start reads it anew and opens a new generation from what
    that read found, and the old read, whenever it ends, changes nothing."""
    rig, c, release, _ = a_read_under_way()
    old = c.reading
    assert old is not None
    rig.watcher._lease_lost.set()
    assert not rig.watcher._keep_lease()  # steps down
    rig.watcher._lease_lost.clear()  # as a new term begins (Watcher.run)
    rig.watcher._term_started = rig.clock()
    try:
        rig.start()  # and opens a new generation in every target
        assert c.need_resync is None and c.reading is None and not old.done()
        rig.tick()
        assert c.need_resync is None
    finally:
        release.set()
    eventually(old.done, what="the old read over")
    rig.tick()
    assert c.reading is None and c.need_resync is None  # nothing owed for it
    assert rig.resyncs("c", Cause.GENERATION_MOVED.value) == 0
    rig.source.put(NODE + b"after", b"{}")
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_target_whose_poll_fails_is_polled_ever_less_often_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A target that stops answering after its initial sync costs the loop a failed read
    after 1 s, then 2, 4... (up to 30 s), while the other target is polled at every tick;
    the drain check leaves it out meanwhile. Once it answers again, it is polled at every
    tick too."""
    rig = Rig()
    fill(rig, nodes=3, identities=3)
    rig.start()
    rig.settle()
    reads: dict[str, int] = {name: 0 for name in rig.targets}
    for t in rig.watcher.targets:

        def read(control: Any = t.control, original: Any = t.control.read) -> Any:
            reads[control.name] += 1
            return original()

        t.control.read = read  # type: ignore[method-assign]
    rig.mesh["c"].set_down(True)
    for _ in range(16):  # 8 s of polls, one every 0.5 s or more often
        rig.tick()
        rig.reads_over()  # a read of c after a failed one is taken up by the next poll
    assert reads["b"] >= 16
    # at 0 s (failed at once: the poll waited for it), at 1 s (taken up at 1.5 s) and at
    # 3.5 s (taken up at 4 s, the next due at 8 s)
    assert reads["c"] == 3
    # the wait counts from the end of the failed read, not from its start: one that took
    # sync.etcd_timeout (packets dropped) is not tried again at once
    spans: list[tuple[float, float]] = []
    c_target = next(t for t in rig.watcher.targets if t.name == "c")
    c = c_target.control
    failing = c.read

    begun_reads = threading.Semaphore(0)
    timed_out = threading.Semaphore(0)

    def slow_failure() -> Any:
        begun = rig.clock()
        begun_reads.release()
        # the test's thread lets the read's timeout pass on the clock meanwhile
        assert timed_out.acquire(timeout=10)
        spans.append((begun, rig.clock()))
        return failing()

    c.read = slow_failure  # type: ignore[method-assign]
    for _ in range(400):  # 200 s of polls at most
        if len(spans) == 3:
            break
        rig.tick()
        if begun_reads.acquire(timeout=0 if c_target.reading is None else 10):
            rig.clock.advance(rig.settings.sync.etcd_timeout)
            timed_out.release()
        rig.reads_over()
    assert len(spans) == 3
    for (_, ended), (began, _), waited in zip(spans, spans[1:], (8, 16, 30), strict=False):
        assert began - ended >= waited, spans
    c.read = failing  # type: ignore[method-assign]
    drained = drain_checks(monkeypatch)
    rig.watcher._next_drain = 0.0  # a drain check at the next poll
    rig.tick()
    assert "b" in drained and "c" not in drained
    rig.mesh["c"].set_down(False)
    rig.tick(30.0)  # past the longest wait: a read begins
    assert rig.reads_over()
    rig.tick()  # and is taken up: it answered
    before = dict(reads)
    for _ in range(4):
        rig.tick()
    assert reads["c"] - before["c"] == reads["b"] - before["b"] >= 4
    rig.source.put(NODE + b"after", b"{}")
    rig.settle()
    assert rig.cache("c") == rig.expected()


def test_a_superseded_watcher_writes_nothing() -> None:
    """A second watcher takes over (a lease lost to a partition): what the first still
    publishes is refused by the fences, and the target converges on the second's view."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    old = rig.watcher
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.source.put(NODE + b"node-0", b"newest")
    old.feed.etcd.space.streams  # noqa: B018 - both watch the same source
    rig.step(old)  # the old one publishes under its old generation
    rig.settle()
    assert rig.outcomes[Decision.OBSOLETE.value] >= 1
    assert rig.cache("b") == rig.expected()
    assert rig.cache("b")[b"cilium/cache/nodes/v1/a/node-0"] == b"newest"


def test_opening_a_generation_takes_its_revision_from_the_transaction() -> None:
    """The generation's revision is the transaction's own, not a read after it: a target
    wiped right after the write does not make the open fail or return a wrong revision."""
    rig = Rig()
    control = rig.watcher.targets[0].control
    target = rig.mesh["b"]
    records = control.read()
    original = target.txn

    def txn_then_wipe(compares, ops):  # type: ignore[no-untyped-def]
        result = original(compares, ops)
        if any(getattr(op, "key", b"") == gen_key("a") for op in ops):
            target.put(b"unrelated", b"x")  # a later write moves the store on
        return result

    control.etcd.txn = txn_then_wipe  # type: ignore[method-assign]
    rev = control.open_generation(records, GenRecord(5, 4, "id", 1))
    written = target.get(gen_key("a"))
    assert written is not None and written.mod_revision == rev < target.revision()


def test_drain_leaves_a_source_added_back_meanwhile() -> None:
    """A watcher with an old config drains source x; between its read and its delete, x's
    watcher opens a generation again: the drain's compare fails and nothing is deleted."""
    target = MemoryEtcd("b")
    target.put(gen_key("x"), GenRecord(1, 4, "id", 1).encode())
    target.put(draining_key("x"), b'{"since": 0}')
    target.put(b"cilium/cache/nodes/v1/x/n1", b"{}")

    class AddedBack(MemoryEtcd):
        def txn(self, compares, ops):  # type: ignore[no-untyped-def]
            # x's watcher opens a generation and clears the drain record first
            target.txn([], [Put(gen_key("x"), GenRecord(2, 4, "id", 1).encode())])
            target.delete(draining_key("x"))
            return super().txn(compares, ops)

    racing = AddedBack(target.space)
    assert drain_removed(racing, "b", configured=["a", "b"], grace=0.0, now=100.0) == []
    assert target.get(b"cilium/cache/nodes/v1/x/n1") is not None
    assert target.get(gen_key("x")) is not None


def test_drain_removes_a_source_that_left() -> None:
    target = MemoryEtcd("b")
    target.put(gen_key("x"), GenRecord(1, 4, "id", 1).encode())
    target.put(b"cilium/cluster-config/x", b'{"id":9}')
    target.put(b"cilium/cache/nodes/v1/x/n1", b"{}")
    target.put(b"cilium/cache/nodes/v1/a/n1", b"{}")
    assert drain_removed(target, "b", ["a", "b"], grace=10.0, now=100.0) == []
    assert target.get(b"cilium/cluster-config/x") is None  # the config goes first
    assert target.get(b"cilium/cache/nodes/v1/x/n1") is not None
    assert drain_removed(target, "b", ["a", "b"], grace=10.0, now=111.0) == ["x"]
    assert target.items(b"cilium/cache/nodes/v1/x/") == {}
    assert target.items(b"kvmesh/x/") == {}
    assert target.get(b"cilium/cache/nodes/v1/a/n1") is not None


@pytest.mark.parametrize("watched", [True, None])
def test_drain_leaves_alone_a_source_a_watcher_may_still_sync(watched: bool | None) -> None:
    """A source missing from this watcher's config is not drained while another watcher may
    be syncing it (its lease has a value: True; Redis did not answer: None), neither its
    first step nor its last; once nobody may, the drain begins."""
    target = MemoryEtcd("b")
    target.put(gen_key("x"), GenRecord(1, 4, "id", 1).encode())
    target.put(b"cilium/cluster-config/x", b'{"id":9}')
    target.put(gen_key("y"), GenRecord(1, 4, "id", 1).encode())
    target.put(draining_key("y"), b'{"since": 0}')
    target.put(b"cilium/cache/nodes/v1/y/n1", b"{}")
    before = target.items(b"")
    asked: list[str] = []

    def busy(source: str) -> bool | None:
        asked.append(source)
        return watched

    assert drain_removed(target, "b", ["a", "b"], grace=10.0, now=100.0, watched=busy) == []
    assert sorted(asked) == ["x", "y"]
    assert target.items(b"") == before
    assert drain_removed(target, "b", ["a", "b"], grace=10.0, now=100.0) == ["y"]
    assert target.get(b"cilium/cluster-config/x") is None
    assert target.get(draining_key("x")) is not None


def test_a_drain_begun_under_a_running_watcher_is_ended_by_it() -> None:
    """A watcher with an older config began draining this source (the lease was read just
    before this watcher took it): the cluster config is gone and a drain record written.
    This watcher's next fence poll resyncs the target, which ends the drain and puts back
    what it took."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    drain_removed(rig.mesh["b"], "b", ["b", "c"], grace=3600.0, now=time.time())
    assert rig.mesh["b"].get(draining_key("a")) is not None
    assert CONFIG not in rig.cache("b")
    rig.settle()
    assert rig.mesh["b"].get(draining_key("a")) is None
    assert rig.cache("b") == rig.expected()
    assert rig.resyncs("b", Cause.DRAINING.value) == 1


def test_a_new_term_over_a_drain_begun_resyncs_instead_of_resuming() -> None:
    """A drain began while no watcher ran this source: the next term does not resume from
    the fences (that would leave the cluster config the drain took away out) but resyncs."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.watcher.close()
    drain_removed(rig.mesh["b"], "b", ["b", "c"], grace=3600.0, now=time.time())
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    assert rig.mesh["b"].get(draining_key("a")) is None
    assert rig.cache("b") == rig.expected()
    assert rig.resyncs("b", Cause.DRAINING.value) == 1
    assert rig.resyncs("c") == 0  # the target no drain touched resumes


def test_a_drain_begun_between_a_terms_read_and_its_open_is_ended_too() -> None:
    """A new term read the target's records (no drain record: it would resume), then a
    watcher with an older config began draining the source, taking its cluster config.
    The open, guarded by the drain record as read, fails, and the target is resynced, which
    puts the cluster config back (a resume would have left it out for good)."""
    rig = Rig()
    fill(rig, nodes=5, identities=5)
    rig.start()
    rig.settle()
    rig.watcher.close()
    rig.watcher = rig.new_watcher()
    control = next(t.control for t in rig.watcher.targets if t.name == "b")
    original = control.read
    drains: list[float] = []

    def read_then_drain() -> Any:
        records = original()
        if not drains:
            drains.append(time.time())
            drain_removed(rig.mesh["b"], "b", ["b", "c"], grace=3600.0, now=drains[0])
        return records

    control.read = read_then_drain  # type: ignore[method-assign]
    rig.start()
    rig.settle()
    assert drains, "the term read no records"
    assert rig.mesh["b"].get(draining_key("a")) is None
    assert rig.cache("b") == rig.expected()
    # the failed open leaves the target owed a resync, as any failure at a term's start
    assert rig.resyncs("b", Cause.START.value) == rig.resyncs("b") == 1


def test_the_feed_inbox_is_bounded_and_holds_back_the_watch() -> None:
    """A watcher that falls behind makes the watch threads wait, instead of queueing every
    response in memory."""
    feed, pumping = _three_streams_owing(inbox=2)
    eventually(lambda: feed.inbox.qsize() == 2, what="the inbox full")
    pumping.join(0.2)
    assert pumping.is_alive()  # three streams owe a response, the inbox takes two
    assert feed.inbox.qsize() == 2
    items = feed.next(0.1, 10)
    pumping.join(5)
    assert not pumping.is_alive()
    items += feed.next(0.1, 10)
    assert sum(len(i.events) for i in items if hasattr(i, "events")) == 9
    feed.stop()


def test_the_source_is_read_with_a_client_that_cannot_write() -> None:
    rig = Rig()
    assert rig.watcher.feed.etcd.read_only  # type: ignore[attr-defined]
    with pytest.raises(RetryableError):
        rig.watcher.feed.etcd.txn([ModIs(CONFIG, 0)], [Put(CONFIG, b"x")])


def test_every_resource_has_a_stream() -> None:
    rig = Rig()
    fill(rig, nodes=1, identities=1)
    rig.start()
    assert set(rig.watcher.feed.streams) == set(RESOURCE_BY_NAME)


@pytest.mark.parametrize("idle_flush", [True, False])
def test_the_linger_spaces_flushes_only_while_tasks_wait(idle_flush: bool) -> None:
    """With sync.idle_flush, a change is published at once while the source's queue is
    empty; one that comes while a task waits in the queue lingers, and goes as soon as the
    workers have taken that task, before the linger is over. Without it, a change that
    follows a flush closely waits out the linger whatever the queue holds."""
    rig = Rig(linger=0.01, idle_flush=idle_flush)
    fill(rig, nodes=2, identities=0)
    rig.start()
    rig.settle()
    w = rig.watcher

    def change(name: bytes) -> int:
        """Put a node and run one pass of the loop, with no time passing; the flushes so
        far."""
        rig.source.put(NODE + name, b"{}")
        rig.mesh.pump()
        w.step(max_wait=0)
        return rig.queue.flushes

    def queued() -> set[bytes]:
        return {op.key.rsplit(b"/", 1)[1] for b in rig.queue.batches for op in b.ops}

    rig.clock.advance(1.0)  # a quiet spell
    flushes = rig.queue.flushes
    assert change(b"first") == flushes + 1  # published at once
    rig.work()  # the workers take it
    rig.clock.advance(0.003)  # 3 ms after that flush, inside the linger of 10
    if idle_flush:
        assert change(b"second") == flushes + 2  # the queue is empty: at once
        assert change(b"third") == flushes + 2  # a task waits in the queue: this lingers
        assert change(b"fourth") == flushes + 2
        rig.work()
        rig.clock.advance(0.003)  # the queue's length is looked at every 2 ms, at most
        w.step(max_wait=0)
        # the queue emptied: both go, in one flush, 3 ms into the linger
        assert rig.queue.flushes == flushes + 3
        assert queued() == {b"third", b"fourth"}
        # a burst (as many changes as shards, in one transaction) right after a flush
        # lingers even with the queue empty: piecemeal, it would chain every shard
        rig.work()
        rig.clock.advance(0.003)
        shards = rig.settings.sync.shards
        rig.source.txn([], [Put(NODE + b"burst-%d" % i, b"{}") for i in range(shards)])
        rig.mesh.pump()
        w.step(max_wait=0)
        assert rig.queue.flushes == flushes + 3
        rig.clock.advance(0.01)
        w.step(max_wait=0)
        assert rig.queue.flushes == flushes + 4
    else:
        assert change(b"second") == flushes + 1  # the queue is empty, and it waits
        rig.clock.advance(0.007)
        w.step(max_wait=0)
        assert rig.queue.flushes == flushes + 2
        assert queued() == {b"second"}
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_steady_stream_of_changes_lingers_even_with_the_queue_empty() -> None:
    """The idle flush publishes a change at once while the queue is empty, unless the
    source's changes come faster than sync.idle_flush_max_rate: then each flush waits out
    the linger, and one task carries what came meanwhile. After a quiet spell a change
    goes at once again."""
    rig = Rig(linger=0.01, idle_flush=True, idle_flush_max_rate=100)
    fill(rig, nodes=2, identities=0)
    rig.start()
    rig.settle()
    w = rig.watcher
    rig.clock.advance(1.0)  # a quiet spell
    counter = iter(range(1000))

    def change() -> int:
        """Put a node, run one pass of the loop, let the workers take what it published
        and move the clock on 2.5 ms (400 changes a second; the queue's length is looked at
        again 2 ms after a flush); the flushes so far."""
        rig.source.put(NODE + b"n%d" % next(counter), b"{}")
        rig.mesh.pump()
        w.step(max_wait=0)
        rig.work()
        rig.clock.advance(0.0025)
        return rig.queue.flushes

    flushes = rig.queue.flushes
    assert change() == flushes + 1  # the first goes at once (10 a second, lately)
    assert change() == flushes + 2  # so does the second (about 20 a second)
    # ... until the rate passes 100 a second, at the 12th change: from then on the queue
    # is empty at every pass, and still the changes wait for the linger
    for _ in range(9):
        change()
    assert rig.queue.flushes == flushes + 11
    before = rig.queue.flushes
    for _ in range(20):
        change()
    # 50 ms of changes: a flush per 10 ms of linger, not one per change
    assert 4 <= rig.queue.flushes - before <= 6
    rig.clock.advance(1.0)  # quiet again: the rate fades
    w.step(max_wait=0)
    rig.work()
    flushes = rig.queue.flushes
    assert change() == flushes + 1
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def quiet_rig(**sync: Any) -> Rig:
    """A rig of two nodes, synced, then quiet for a second (no recent changes count towards
    the source's rate)."""
    rig = Rig(**sync)
    fill(rig, nodes=2, identities=0)
    rig.start()
    rig.settle()
    rig.clock.advance(1.0)
    return rig


@pytest.mark.parametrize("limit", [0, 500])
def test_with_no_rate_limit_the_idle_flush_sends_every_change_at_once(limit: int) -> None:
    """sync.idle_flush_max_rate = 0: the idle flush applies at any rate. Three changes
    every 2.5 ms (1,200 a second; fewer than the rig's four shards) then make a flush each,
    where the default limit of 500 has them linger once the rate's average has risen past
    it."""
    rig = quiet_rig(linger=0.01, idle_flush=True, idle_flush_max_rate=limit)
    w = rig.watcher
    flushes = rig.queue.flushes
    for i in range(60):
        rig.source.txn([], [Put(NODE + b"n%d-%d" % (i, j), b"{}") for j in range(3)])
        rig.mesh.pump()
        w.step(max_wait=0)
        rig.work()
        rig.clock.advance(0.0025)
    if limit:
        # idle until the average passed 500 a second (at the 22nd step), then a flush per
        # linger (every fourth step)
        assert rig.queue.flushes - flushes < 60 - 20
    else:
        assert rig.queue.flushes == flushes + 60


class _CountedLease:
    """A leader lease that counts its renewals and releases; a broken one's renewal raises
    what no Redis client would."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.renewals = 0
        self.releases = 0

    def renew(self) -> bool:
        self.renewals += 1
        if self.broken:
            raise RuntimeError("a renewal failed in a way nobody foresaw")
        return True

    def release(self) -> None:
        self.releases += 1


def _renewing(lease: _CountedLease) -> tuple[Rig, _CountedLease, threading.Thread]:
    """A watcher in a term with *lease*, its lease thread running."""
    rig = Rig(leader_ttl=1.0)
    w = rig.watcher
    w.lease = lease  # type: ignore[assignment]
    w._beat = w.clock()
    w._in_term.set()
    keeper = threading.Thread(target=w._renew_loop, daemon=True)
    keeper.start()
    return rig, lease, keeper


def test_a_hung_loop_releases_the_lease_for_a_standby() -> None:
    """A main loop that has not beaten its heart for _stuck_after seconds is hung: the lease
    thread stops renewing and releases the lease at once, so that a standby need not wait
    for its TTL to run out."""
    rig, lease, keeper = _renewing(_CountedLease())
    w = rig.watcher
    try:
        rig.clock.advance(w._stuck_after + 1.0)
        eventually(w._lease_lost.is_set, timeout=10, interval=0.05, what="the lease let go")
        # released before the loop was told, and not renewed
        assert not w._in_term.is_set() and (lease.releases, lease.renewals) == (1, 0)
    finally:
        w.stop_event.set()
        keeper.join(10)


def test_a_lease_renewal_that_raises_steps_the_watcher_down_and_the_thread_lives() -> None:
    """Whatever a renewal raises, the lease thread treats it as a lease not kept: the
    watcher steps down (and campaigns again later), and the thread keeps running, so that a
    later term still has its lease renewed and its hung loop seen."""
    rig, lease, keeper = _renewing(_CountedLease(broken=True))
    w = rig.watcher
    try:
        eventually(w._lease_lost.is_set, timeout=10, interval=0.05, what="the lease let go")
        assert not w._in_term.is_set()
        w._lease_lost.clear()
        w._in_term.set()  # a new term: the same thread renews again
        eventually(w._lease_lost.is_set, timeout=10, interval=0.05, what="let go again")
        assert keeper.is_alive() and lease.renewals >= 2
        assert lease.releases == 0  # not hung: the key stays this watcher's to win back
    finally:
        w.stop_event.set()
        keeper.join(10)


def test_the_feed_inbox_is_bounded_in_bytes_too() -> None:
    """Responses larger than the room left in the inbox wait for the watcher; one larger than
    the whole inbox still goes in, alone."""
    feed, pumping = _three_streams_owing(inbox_bytes=1)
    eventually(lambda: feed.inbox.qsize() == 1, what="one response in")
    pumping.join(0.2)
    assert pumping.is_alive()  # three streams owe a response, the inbox's bytes take one
    assert feed.inbox.qsize() == 1
    assert feed.queued > 1
    items: list[FeedItem] = []
    eventually(
        lambda: items.extend(feed.next(0.1, 10)) or _events(items) == 9,
        what="every response taken",
    )
    pumping.join(5)
    assert not pumping.is_alive()
    assert feed.queued == 0
    feed.stop()


def test_the_watcher_takes_about_the_inbox_bytes_at_a_time() -> None:
    feed = SourceFeed(MemoryEtcd("a").reader(), "a", "id", 15.0, lambda: None, inbox_bytes=1000)
    nodes = RESOURCE_BY_NAME["nodes"]
    for size in (500, 500, 0):
        feed._put(feed.epoch, Delivered(nodes, [], 7, size))
    assert len(feed.next(0, 10)) == 2
    assert feed.queued == 0
    assert len(feed.next(0, 10)) == 1


def _events(items: list[FeedItem]) -> int:
    return sum(len(i.events) for i in items if isinstance(i, Delivered))


def test_large_values_are_flushed_before_the_linger_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending changes are published once their bytes pass a bound, as once their number
    does, however long the linger."""
    monkeypatch.setattr(watcher_module, "_FLUSH_BYTES", 10_000)
    rig = Rig(linger=60.0, idle_flush=False)
    fill(rig, nodes=1, identities=0)
    rig.start()
    rig.settle()
    value = b'{"name":"' + b"n" * 3000 + b'"}'
    rig.source.put(NODE + b"first", b"{}")  # after a quiet spell: published at once
    rig.mesh.pump()
    rig.watcher.step(max_wait=0)
    flushes = rig.queue.flushes
    for i in range(3):  # 9 KB: under the bound, they wait for the linger
        rig.source.put(NODE + b"big-%d" % i, value)
    rig.mesh.pump()
    rig.watcher.step(max_wait=0)
    assert rig.queue.flushes == flushes
    assert rig.watcher.buffer.bytes > 9000
    rig.source.put(NODE + b"big-3", value)  # 12 KB
    rig.mesh.pump()
    rig.watcher.step(max_wait=0)
    assert rig.queue.flushes == flushes + 1
    assert rig.watcher.buffer.bytes == 0
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_stream_whose_responses_wait_in_the_inbox_is_not_silent() -> None:
    """The loop takes a few megabytes a pass, so a response can wait in the inbox past the
    watch timeout; its stream spoke, and is not replaced (a replacement would deliver the
    waiting revisions again)."""
    now = [0.0]
    source = MemoryEtcd("a")
    feed = SourceFeed(source.reader(), "a", "id", 15.0, lambda: None, clock=lambda: now[0])
    feed.cluster_id = source.header()[1]
    feed.start(1)
    source.put(NODE + b"n1", b"{}")
    source.pump()
    assert feed.inbox.qsize() == 1
    streams = dict(feed.streams)
    now[0] = 20.0
    assert feed.check_silence() == []
    # the others, which said nothing, are replaced; the nodes stream has a response waiting
    assert feed.streams["nodes"] is streams["nodes"]
    assert feed.streams["services"] is not streams["services"]
    assert _events(feed.next(0, 10)) == 1
    assert feed.pending["nodes"] == 0
    now[0] = 40.0  # 20 s since the loop took it, and nothing waits: silent
    feed.check_silence()
    assert feed.streams["nodes"] is not streams["nodes"]
    feed.stop()


def test_watch_threads_waiting_for_room_go_in_the_order_they_came() -> None:
    """A small part that fits does not overtake a larger one that waits for room before it."""
    feed = SourceFeed(MemoryEtcd("a").reader(), "a", "id", 15.0, lambda: None, inbox_bytes=1000)
    nodes, services = RESOURCE_BY_NAME["nodes"], RESOURCE_BY_NAME["services"]
    feed._put(feed.epoch, Delivered(nodes, [], 1, 600))
    large = Delivered(nodes, [], 2, 900)
    small = Delivered(services, [], 3, 100)  # 700 bytes would fit now
    threads = [
        threading.Thread(target=feed._put, args=(feed.epoch, d), daemon=True)
        for d in (large, small)
    ]
    try:
        threads[0].start()
        eventually(lambda: len(feed._line) == 1, timeout=10, what="the large part waiting")
        threads[1].start()
        eventually(lambda: len(feed._line) == 2, timeout=10, what="the small part behind it")
        assert feed.inbox.qsize() == 1
        taken = feed.next(0, 1)
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        taken += feed.next(0, 10)
        assert [getattr(i, "header_rev", None) for i in taken] == [1, 2, 3]
        assert feed.queued == 0
    finally:
        feed.stop()  # a thread still waiting gives up


def test_bad_input_is_logged_a_hundred_lines_a_minute_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source of many bad keys logs a hundred of them a minute for each reason and one
    line for the rest, and counts every one (the lines are the feature here)."""
    rig = Rig()
    fill(rig, nodes=1, identities=1)
    for i in range(115):
        rig.source.put(IDENTITY + b"00%d" % i, b"x")  # not canonical
    caplog.set_level(logging.WARNING, logger="kvmesh.watcher")
    rig.start()
    rig.settle()
    assert rig.metric("kvmesh_watcher_rejected_total", source_cluster="a", reason="layout") == 115
    assert sum(": not synced: " in r.getMessage() for r in caplog.records) == 100
    rig.tick(61.0)
    rest = [r.getMessage() for r in caplog.records if "more changes not synced" in r.getMessage()]
    assert len(rest) == 1
    assert rest[0].startswith("a: 15 more changes not synced as layout in the last ")
    rig.tick(61.0)  # said once
    assert sum("more changes not synced" in r.getMessage() for r in caplog.records) == 1


def _three_streams_owing(**bounds: int) -> tuple[SourceFeed, threading.Thread]:
    """A started feed with the inbox *bounds* given, three writes to each of three
    resources, and a thread pumping the responses their streams owe into the feed (it
    blocks while the inbox has no room)."""
    source = MemoryEtcd("a")
    feed = SourceFeed(source.reader(), "a", "id", 15.0, on_failure=lambda: None, **bounds)
    feed.cluster_id = source.header()[1]
    feed.start(1)
    for i in range(3):
        source.put(NODE + b"n%d" % i, b"{}")
        source.put(IDENTITY + str((1 << 16) + i).encode(), b"x")
        source.put(b"cilium/state/services/v1/a/s%d" % i, b"{}")
    pumping = threading.Thread(target=source.pump)
    pumping.start()
    return feed, pumping


@pytest.mark.parametrize("after_ack", [True, False])
def test_a_flush_waits_while_a_worker_holds_its_shards_last_task(after_ack: bool) -> None:
    """With sync.flush_after_ack, a change in a shard whose last task a worker still holds
    waits until the worker is done with it (looked at every 2 ms), then goes at once; it
    waits sync.max_linger after the last flush at most. A change in a shard no worker
    holds goes as before. Without the setting, every change goes as before, and the
    publisher is not asked to follow the tasks."""
    rig = quiet_rig(linger=0.01, max_linger=0.1, idle_flush=True, flush_after_ack=after_ack)
    w = rig.watcher
    values = iter(range(1000))

    def change(name: bytes) -> int:
        """Put a node and run one pass of the loop, with no time passing; the flushes so
        far."""
        rig.source.put(NODE + name, b'{"v":%d}' % next(values))
        rig.mesh.pump()
        w.step(max_wait=0)
        return rig.queue.flushes

    def wait(seconds: float) -> int:
        """Passes of the loop every 2.5 ms (the workers are looked at every 2) for
        *seconds*; the flushes so far."""
        for _ in range(round(seconds / 0.0025)):
            rig.clock.advance(0.0025)
            w.step(max_wait=0)
        return rig.queue.flushes

    flushes = rig.queue.flushes
    assert change(b"n1") == flushes + 1  # published at once
    assert rig.queue.tracked[-1] is after_ack
    shard = rig.queue.batches[-1].shard
    rig.work()  # a worker took it (the queue is empty) ...
    rig.queue.busy = {shard}  # ... and is still applying it
    rig.clock.advance(0.003)
    if after_ack:
        assert change(b"n1") == flushes + 1  # the same key, so the same shard: it waits
        looks = rig.queue.looks
        for _ in range(3):  # more changes while it waits: no look of their own ...
            assert change(b"n1") == flushes + 1
        assert rig.queue.looks == looks
        assert wait(0.02) == flushes + 1  # past the linger, as long as the worker holds it
        assert rig.queue.looks == looks + 8  # ... a look at each pass, 2.5 ms apart
        rig.queue.busy = set()  # the worker is done
        assert wait(0.0025) == flushes + 2  # at the next look
        held = {"source_cluster": "a"}
        assert rig.metric("kvmesh_watcher_flushes_held_total", **held) == 1
        assert rig.metric("kvmesh_watcher_flush_held_seconds_total", **held) == pytest.approx(
            0.0225
        )
        rig.work()
        rig.queue.busy = {shard}  # a worker holds that task, and keeps it
        rig.clock.advance(0.003)
        assert change(b"n1") == flushes + 2
        assert wait(0.09) == flushes + 2  # 93 ms after the flush
        assert wait(0.01) == flushes + 3  # 100 ms: sync.max_linger is over
        assert rig.metric("kvmesh_watcher_flushes_held_total", **held) == 2
    else:
        assert change(b"n1") == flushes + 2  # the queue is empty: at once
        assert rig.metric("kvmesh_watcher_flushes_held_total", source_cluster="a") == 0
    rig.work()
    rig.queue.busy = {"no-such-shard"}  # workers busy with other shards hold nothing up
    rig.clock.advance(1.0)
    flushes = rig.queue.flushes
    assert change(b"n2") == flushes + 1
    rig.queue.busy = set()
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()


def test_a_full_buffer_goes_whatever_the_workers_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """sync.flush_after_ack bounds what waits: a buffer that reaches the flush size (8,192
    changes; 3 here) is published though a worker holds its shard's last task."""
    monkeypatch.setattr(watcher_module, "_FLUSH_AT", 3)
    rig = quiet_rig(linger=0.01, max_linger=0.5, idle_flush=True)
    w = rig.watcher
    flushes = rig.queue.flushes
    rig.source.put(NODE + b"n1", b'{"v":0}')
    rig.mesh.pump()
    w.step(max_wait=0)
    assert rig.queue.flushes == flushes + 1
    rig.work()
    rig.queue.busy = {rig.queue.seen[-1].shard}
    rig.clock.advance(0.003)
    for v in (1, 2):
        rig.source.put(NODE + b"n1", b'{"v":%d}' % v)
        rig.mesh.pump()
        w.step(max_wait=0)
    assert rig.queue.flushes == flushes + 1  # one change (coalesced), waiting
    for name in (b"n2", b"n3", b"n4", b"n5"):
        rig.source.put(NODE + name, b"{}")
    rig.mesh.pump()
    w.step(max_wait=0)
    assert rig.queue.flushes == flushes + 2  # three or more buffered: gone, held or not
    rig.queue.busy = set()
    rig.settle()
    for target in rig.targets:
        assert rig.cache(target) == rig.expected()
