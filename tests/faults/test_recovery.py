"""Recovery on a mesh of its own, without churn, where what recovery did can be counted
exactly: a worker killed with batches in hand, a watcher that resumes from its fences
instead of listing, and a compacted history that forces a diff with its deletes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.tools.cilium_state import identity_id, write_items

from ..harness import Mesh, Servers, eventually
from ..integration.test_sync import assert_equal, seed

pytestmark = pytest.mark.faults


@pytest.fixture
def plain(servers: Servers) -> Iterator[Mesh]:
    m = Mesh(servers)
    try:
        yield m
    finally:
        m.stop()


def test_worker_killed_mid_stream(plain: Mesh) -> None:
    """A worker SIGKILLed with batches in hand that have not landed loses nothing: the cache
    converges exactly, including what changed while no worker ran."""
    mesh = plain
    seed(mesh, identities=50, endpoints=50)
    a = mesh.client(0)
    items = {
        f"cilium/state/ip/v1/default/10.9.{i // 250}.{i % 250}".encode(): b"x" * 200
        for i in range(3000)
    }
    write_items(a, items)
    mesh.watcher()
    mesh.backlog(tasks=3, sources=["cluster-a"])  # the snapshot waits in the queue
    victim, _, _ = mesh.catch_in_hand("victim")
    victim.kill()
    for i in range(0, 300, 3):  # churn while no worker runs: updates and deletes
        key = f"cilium/state/ip/v1/default/10.9.{i // 250}.{i % 250}".encode()
        if i % 2:
            a.delete(key)
        else:
            a.put(key, b"updated")
    mesh.worker("worker-after")
    assert_equal(mesh)


def test_watcher_restart_resumes_from_fences(plain: Mesh) -> None:
    """A restarted watcher resumes from the fences without listing again, and picks up what
    changed while it was down."""
    mesh = plain
    seed(mesh, identities=100)
    mesh.worker()
    w1 = mesh.watcher("watch1")
    assert_equal(mesh)
    b = mesh.client(1)
    eventually(
        lambda: b.count(b"cilium/synced/cluster-a/") == 5,
        what="every canary of cluster-a in cluster-b",
    )
    # and of the other pair: both resume only if both had finished their fences
    eventually(
        lambda: mesh.client(0).count(b"cilium/synced/cluster-b/") == 5,
        what="every canary of cluster-b in cluster-a",
    )
    eventually(
        lambda: all(mesh.recorded(*pair) for pair in mesh.pairs()),
        what="progress records that vouch for every fence",
    )
    w1.kill()
    a = mesh.client(0)
    a.put(b"cilium/state/nodes/v1/cluster-a/late-node", b"{}")
    a.delete(b"cilium/state/nodes/v1/cluster-a/node-1")
    w2 = mesh.watcher("watch2")
    eventually(lambda: w2.metric("kvmesh_watcher_resumes_total") == 2, what="both pairs resumed")
    assert_equal(mesh)
    assert w2.metric("kvmesh_watcher_resyncs_total") == 0, w2.metrics()


def test_compaction_while_watcher_down_forces_a_diff_resync(plain: Mesh) -> None:
    """With the source's history compacted, the watcher lists at one revision and diffs,
    deletes included, instead of replaying."""
    mesh = plain
    seed(mesh, identities=100)
    mesh.worker()
    w1 = mesh.watcher("watch1")
    assert_equal(mesh)
    b = mesh.client(1)
    # every canary: every fence is done, and a record vouches for every fence, so the
    # restart could resume if history allowed
    eventually(lambda: b.count(b"cilium/synced/cluster-a/") == 5, what="every canary")
    eventually(
        lambda: mesh.recorded("cluster-a", "cluster-b"),
        what="a progress record that vouches for every fence",
    )
    w1.kill()
    a = mesh.client(0)
    for i in range(20):
        a.delete(f"cilium/state/identities/v1/id/{identity_id(1, i)}".encode())
        a.put(f"cilium/state/nodes/v1/cluster-a/new-{i}".encode(), b"{}")
    a.compact(a.revision())
    w2 = mesh.watcher("watch2")
    assert_equal(mesh)
    pair = {"source_cluster": "cluster-a", "target_cluster": "cluster-b"}
    eventually(
        lambda: w2.metric("kvmesh_watcher_resyncs_total", reason="compacted", **pair) == 1,
        what="a resync for the compaction",
    )
    # the 20 deleted identities, found by the diff
    assert w2.metric("kvmesh_watcher_resync_keys_total", kind="extra", **pair) == 20
    assert b.get(f"cilium/cache/identities/v1/cluster-a/id/{identity_id(1, 3)}".encode()) is None
