"""Leases on cached keys (sync.cache_lease_ttl), with the real watcher and applier on
in-memory etcds: at most 1,000 keys a lease, kept alive by whichever watcher is active, a
lease that ends restored by a resync, and keys on someone else's lease (KVStoreMesh's, when
kvmesh takes over from it) written again onto kvmesh's own."""

from __future__ import annotations

from collections import Counter

from pipeline.clients.etcd import Put
from pipeline.protocol.fence import Decision
from pipeline.protocol.names import lease_prefix
from pipeline.source.leases import MAX_KEYS_PER_LEASE
from pipeline.source.planner import Cause
from tests.memory_etcd import MemoryEtcd
from tests.rig import Rig

IDENTITY = b"cilium/state/identities/v1/id/"
NODE = b"cilium/state/nodes/v1/a/"
TTL = 60


def fill(rig: Rig, identities: int) -> None:
    rig.source.txn([], [Put(b"cilium/cluster-config/a", b'{"id":1}')])
    for start in range(0, identities, 120):
        rig.source.txn(
            [],
            [
                Put(IDENTITY + str((1 << 16) + i).encode(), b"k8s:app=x%d" % i)
                for i in range(start, min(identities, start + 120))
            ],
        )
    rig.source.put(NODE + b"node-0", b"{}")


def leases_of(target: MemoryEtcd, prefix: bytes = b"cilium/") -> Counter[int]:
    _, kvs = target.scan(prefix)
    return Counter(kv.lease for kv in kvs if not kv.key.startswith(b"cilium/state/"))


def test_cached_keys_sit_on_leases_of_at_most_1000_keys() -> None:
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 2500)
    rig.start()
    rig.settle()
    for name in rig.targets:
        target = rig.mesh[name]
        assert rig.cache(name) == rig.expected()
        per_lease = leases_of(target)
        assert 0 not in per_lease  # the cluster config and the canaries too
        assert max(per_lease.values()) <= MAX_KEYS_PER_LEASE
        assert len(per_lease) >= 3
        recorded = {int(k.rsplit(b"/", 1)[1], 16) for k in target.keys(lease_prefix("a"))}
        assert set(per_lease) <= recorded


def test_a_lease_that_ends_takes_its_keys_and_a_resync_restores_them() -> None:
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 1500)
    rig.start()
    rig.settle()
    target = rig.mesh["b"]
    lease = leases_of(target).most_common(1)[0][0]
    target.revoke_lease(lease)  # what an expiry does: the keys go with it
    assert rig.cache("b") != rig.expected()
    rig.tick(TTL / 3 + 1)
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert rig.resyncs("b", Cause.LEASE_EXPIRED.value) == 1
    assert rig.resyncs("c", Cause.LEASE_EXPIRED.value) == 0


def test_the_next_watcher_keeps_the_same_leases_alive_and_resumes() -> None:
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 300)
    rig.start()
    rig.settle()
    before = {name: set(leases_of(rig.mesh[name])) for name in rig.targets}
    rig.watcher = rig.new_watcher()  # a restart, or a standby taking over
    rig.start()
    rig.settle()
    for name in rig.targets:
        assert (
            set(rig.watcher.targets[rig.targets.index(name)].control.leases.known) >= before[name]
        )
        assert rig.resyncs(name) == 0  # resumed from the fences, nothing rewritten
    rig.source.put(NODE + b"node-1", b"{}")
    rig.settle()
    assert all(rig.cache(name) == rig.expected() for name in rig.targets)


def test_a_worker_given_a_lease_that_ended_asks_for_a_resync() -> None:
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 10)
    rig.start()
    rig.settle()
    rig.source.put(NODE + b"node-1", b"{}")
    rig.step()
    batch = next(b for b in rig.queue.batches if b.target == "b")
    rig.queue.batches.remove(batch)
    rig.mesh["b"].revoke_lease(batch.lease)
    assert rig.apply(batch) is Decision.RESYNC
    rig.settle()
    assert rig.cache("b") == rig.expected()


def test_keys_on_another_writers_lease_are_written_again_on_takeover() -> None:
    """Taking over a cache KVStoreMesh wrote: its keys hold the same values, on its lease.
    The first resync writes every one of them again (on no lease, here), so when that
    lease ends nothing goes."""
    rig = Rig()
    fill(rig, 200)
    target = rig.mesh["b"]
    theirs = target.grant_lease(900)
    for key, value in rig.expected().items():
        target.txn([], [Put(key, value, theirs)])
    rig.start()
    rig.settle()
    assert set(leases_of(target)) == {0}
    target.revoke_lease(theirs)
    assert rig.cache("b") == rig.expected()
