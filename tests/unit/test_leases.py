"""Leases on cached keys (sync.cache_lease_ttl), with the real watcher and applier on
in-memory etcds: at most 1,000 keys a lease, kept alive by whichever watcher is active, a
lease that ends restored by a resync, and keys on someone else's lease (KVStoreMesh's, when
kvmesh takes over from it) written again onto kvmesh's own."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from pipeline.clients.etcd import Delete, Put
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.fence import Decision
from pipeline.protocol.layout import RESOURCE_BY_NAME, canary_key
from pipeline.protocol.names import gen_key, lease_key, lease_prefix
from pipeline.source.leases import MAX_KEYS_PER_LEASE, TargetLeases
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


def synced(identities: int) -> Rig:
    """A rig with leases on, its source filled and synced."""
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, identities)
    rig.start()
    rig.settle()
    return rig


def target_leases() -> tuple[MemoryEtcd, TargetLeases]:
    """One source's leases in an empty target, without a watcher."""
    etcd = MemoryEtcd("b")
    leases = TargetLeases(etcd, "a", TTL)
    leases.ensure_loaded()
    return etcd, leases


def emptied_lease(leases: TargetLeases) -> int:
    """A full lease, then a second one, then every key of the first deleted: the first is
    retired, with the chain (1, {"s0": (3, 0)})."""
    keys = [b"k%d" % i for i in range(MAX_KEYS_PER_LEASE)]
    first = leases.take(keys, [], 1, {"s0": (1, 0)})
    leases.take([b"x"], [], 1, {"s0": (2, 0)})
    leases.take([], keys, 1, {"s0": (3, 0)})
    return first


def leases_of(target: MemoryEtcd, prefix: bytes = b"cilium/") -> Counter[int]:
    _, kvs = target.scan(prefix)
    return Counter(kv.lease for kv in kvs if not kv.key.startswith(b"cilium/state/"))


def test_cached_keys_sit_on_leases_of_at_most_1000_keys() -> None:
    rig = synced(2500)
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
    rig = synced(1500)
    target = rig.mesh["b"]
    lease = leases_of(target).most_common(1)[0][0]
    target.revoke_lease(lease)  # what an expiry does: the keys go with it
    assert rig.cache("b") != rig.expected()
    rig.watcher.keep_leases_once()  # the keepalive thread's round
    rig.settle()
    assert rig.cache("b") == rig.expected()
    assert rig.resyncs("b", Cause.LEASE_EXPIRED.value) == 1
    assert rig.resyncs("c", Cause.LEASE_EXPIRED.value) == 0
    # the ended lease's record stayed until the resync rewrote its keys, and then went:
    # the next watcher resumes
    assert lease_key("a", lease) not in target.keys(lease_prefix("a"))
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    assert rig.resyncs("b") == 0
    assert rig.cache("b") == rig.expected()


def test_the_next_watcher_keeps_the_same_leases_alive_and_resumes() -> None:
    rig = synced(300)
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
    rig = synced(10)
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


def test_a_retired_lease_is_revoked_only_after_its_batches_landed() -> None:
    """A lease no key sits on yet, whose batches still wait in the queue, stays; once they
    landed and every key moved on to newer leases, it is revoked and its record goes."""
    rig = synced(10)
    leases = rig.watcher.targets[0].control.leases  # target b
    first = leases.current
    fill(rig, 2100)  # more than two leases' worth of puts
    rig.step()
    queued = list(rig.queue.batches)
    assert any(b.lease == first for b in queued if b.target == "b")
    rig.queue.batches = []
    rig.tick()  # the fence poll collects: nothing of the queued batches has landed
    assert first in leases.known
    rig.work(queued)
    rig.settle()
    assert rig.cache("b") == rig.expected()
    # rewrite every key so that the first lease holds none, then let the poll collect it
    for i in range(2100):
        rig.source.put(IDENTITY + str((1 << 16) + i).encode(), b"k8s:app=y%d" % i)
    rig.settle()
    rig.source.put(b"cilium/cluster-config/a", b'{"id":1,"capabilities":{}}')
    rig.source.put(NODE + b"node-0", b'{"n":1}')
    rig.settle()
    rig.tick()
    # every retired lease left holds keys (the first one: the canaries); the emptied ones
    # were revoked, and their records went with them
    target = rig.mesh["b"]
    assert all(target.lease_keys(lease) for lease in leases.known - {leases.current})
    recorded = {int(k.rsplit(b"/", 1)[1], 16) for k in target.keys(lease_prefix("a"))}
    assert recorded == leases.known
    assert len(recorded) < 6  # 2100 rewritten keys emptied the leases they were on
    assert rig.cache("b") == rig.expected()


def test_turning_leases_off_moves_every_key_off_them_before_they_end() -> None:
    rig = synced(300)
    rig.settings = rig.settings.__class__(
        **{
            **rig.settings.__dict__,
            "sync": rig.settings.sync.__class__(
                **{**rig.settings.sync.__dict__, "cache_lease_ttl": 0}
            ),
        }
    )
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    rig.tick()
    for name in rig.targets:
        assert set(leases_of(rig.mesh[name])) == {0}
        assert rig.mesh[name].keys(lease_prefix("a")) == []  # revoked, records gone
        assert rig.cache(name) == rig.expected()


def test_a_lease_record_that_is_not_kvmeshs_is_dropped() -> None:
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 10)
    for junk in (b"-1", b"0x10", b"ffffffffffffffffff", b"", b"zz"):
        rig.mesh["b"].put(lease_prefix("a") + junk, b"")
    rig.start()
    rig.settle()
    keys = rig.mesh["b"].keys(lease_prefix("a"))
    assert keys and all(k[len(lease_prefix("a")) :].isalnum() for k in keys)
    # only the records of leases the watcher granted are left
    known = rig.watcher.targets[0].control.leases.known
    assert {k[len(lease_prefix("a")) :] for k in keys} == {f"{lease:x}".encode() for lease in known}
    assert rig.cache("b") == rig.expected()


def assert_map_matches(rig: Rig, name: str) -> None:
    """The watcher's map of keys to leases is the target's: every key on one of its leases
    is where the map says, and each lease's count is what the target holds on it."""
    leases = rig.watcher.targets[rig.targets.index(name)].control.leases
    _, kvs = rig.mesh[name].scan(b"")
    on_known = {kv.key: kv.lease for kv in kvs if kv.lease in leases.known}
    assert on_known == {k: v for k, v in leases.where.items() if k in on_known}
    assert set(leases.where) == set(on_known)
    assert {k: n for k, n in leases.count.items() if n} == dict(Counter(on_known.values()))
    assert max(leases.count.values(), default=0) <= MAX_KEYS_PER_LEASE


def test_keys_written_again_and_again_need_no_more_leases() -> None:
    """Writes that keep coming to the same keys (nodes, services), with a key now and then
    that stays (an identity), need as many leases as there are keys: one per 1,000 puts
    would leave each lease held by the few keys that stayed, for ever."""
    rig = synced(10)
    for round_ in range(12):
        for start in range(0, 900, 120):
            rig.source.txn(
                [],
                [
                    Put(NODE + b"node-%d" % i, b'{"round":%d}' % round_)
                    for i in range(start, min(900, start + 120))
                ],
            )
        rig.source.put(IDENTITY + str((1 << 16) + 30000 + round_).encode(), b"k8s:app=stays")
        rig.settle()
        rig.tick()  # the fence poll collects what emptied
    for name in rig.targets:
        assert rig.cache(name) == rig.expected()
        leases = rig.watcher.targets[rig.targets.index(name)].control.leases
        assert len(leases.known) == 1  # 927 keys
        assert set(leases_of(rig.mesh[name])) <= leases.known
        assert_map_matches(rig, name)


def test_deleted_keys_leave_room_that_new_keys_take() -> None:
    """Keys deleted from a full lease make room: once the current lease is full, new keys
    go on the emptiest lease with half its room free before a new one is granted."""
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 2400)  # two full leases and one of about 400 keys
    rig.start()
    rig.settle()
    leases = rig.watcher.targets[0].control.leases  # target b
    before = set(leases.known)
    assert len(before) == 3
    for start in range(0, 840, 120):  # most of the first lease's keys
        rig.source.txn(
            [], [Delete(IDENTITY + str((1 << 16) + i).encode()) for i in range(start, start + 120)]
        )
    rig.settle()
    for start in range(0, 840, 120):  # more than the current lease has room for
        rig.source.txn(
            [],
            [
                Put(IDENTITY + str((1 << 16) + 30000 + i).encode(), b"k8s:app=new")
                for i in range(start, start + 120)
            ],
        )
        rig.settle()
    assert rig.cache("b") == rig.expected()
    assert leases.known == before  # no lease granted: the deletes made room
    assert_map_matches(rig, "b")


def test_a_lease_that_holds_keys_is_not_looked_up_at_every_poll() -> None:
    rig = synced(2500)
    for _ in range(5):
        rig.source.put(NODE + b"node-0", b"{}")
        rig.settle()
        rig.tick()
    leases = rig.watcher.targets[0].control.leases
    assert isinstance(leases.etcd, MemoryEtcd)  # the watcher's own client of target b
    looks = leases.etcd.lease_looks
    for _ in range(5):
        rig.tick()
    assert leases.etcd.lease_looks == looks
    assert len(leases.known) == 3
    assert_map_matches(rig, "b")


def test_the_next_watcher_and_a_resync_know_which_keys_each_lease_holds() -> None:
    rig = synced(1500)
    rig.watcher = rig.new_watcher()  # a restart: the map comes from the leases' keys
    rig.start()
    rig.settle()
    for name in rig.targets:
        assert rig.resyncs(name) == 0
        assert_map_matches(rig, name)
    # batches that never land (a new generation made them obsolete) leave the map ahead
    # of the target; the resync that follows fills it again from the target's listing
    for i in range(0, 1500, 3):
        rig.source.put(IDENTITY + str((1 << 16) + i).encode(), b"k8s:app=y%d" % i)
    rig.step()
    rig.queue.batches = [b for b in rig.queue.batches if b.target != "b"]
    rig.watcher.targets[0].owe(Cause.STALLED, "a test")
    rig.settle()
    rig.tick()
    assert rig.resyncs("b", Cause.STALLED.value) == 1
    assert_map_matches(rig, "b")
    known = set(rig.watcher.targets[0].control.leases.known)
    for i in range(1500):  # written again: onto the leases with room, no new one
        rig.source.put(IDENTITY + str((1 << 16) + i).encode(), b"k8s:app=z%d" % i)
    rig.settle()
    rig.tick()
    assert rig.cache("b") == rig.expected()
    assert len(rig.watcher.targets[0].control.leases.known) <= len(known) + 1
    assert_map_matches(rig, "b")


def test_an_emptied_lease_waits_for_the_batches_that_emptied_it() -> None:
    """A lease is revoked only once the batches up to the one that emptied it landed, and
    etcd finds it empty: a revoke before the moves landed would delete the keys before
    their new lease holds them."""
    etcd, leases = target_leases()
    keys = [b"cilium/cache/identities/v1/a/id/%d" % i for i in range(MAX_KEYS_PER_LEASE)]
    first = leases.take(keys, [], 1, {"s0": (10, 0)})
    for key in keys:  # the batch landed
        etcd.txn([], [Put(key, b"v", first)])
    assert leases.take([b"cilium/cache/nodes/v1/a/n"], [], 1, {"s0": (11, 0)}) != first
    moved = leases.take(keys, [], 1, {"s0": (12, 0)})  # written again: first is left empty
    assert moved != first
    assert leases.retired == {first: (1, {"s0": (12, 0)})}
    asked: list[tuple[int, dict[str, tuple[int, int]]]] = []
    looks = etcd.lease_looks

    def not_yet(gen: int, chain: dict[str, tuple[int, int]]) -> bool:
        asked.append((gen, chain))
        return False

    leases.collect(not_yet, 1, {"s0": (12, 0)})
    assert asked == [(1, {"s0": (12, 0)})]
    assert etcd.lease_looks == looks  # not even looked up
    leases.collect(lambda gen, chain: True, 1, {"s0": (13, 0)})
    assert first in leases.known  # etcd still has the keys on it: they are on their way
    assert leases.retired == {first: (1, {"s0": (13, 0)})}
    for key in keys:  # the moves land
        etcd.txn([], [Put(key, b"v", moved)])
    leases.collect(lambda gen, chain: True, 1, {"s0": (13, 0)})
    assert first not in leases.known
    assert etcd.keepalive(first) == 0  # revoked
    assert etcd.keys(lease_prefix("a")) == [lease_key("a", lease) for lease in sorted(leases.known)]


def test_a_watcher_that_takes_the_term_again_reads_the_leases_granted_meanwhile() -> None:
    rig = synced(600)
    first = rig.watcher
    rig.watcher = rig.new_watcher()  # another watcher's term
    rig.start()
    for i in range(5):
        rig.source.put(IDENTITY + str((1 << 16) + 30000 + i).encode(), b"k8s:app=new")
    rig.settle()
    granted = rig.watcher.targets[0].control.leases.known - first.targets[0].control.leases.known
    assert granted  # the lease it had was more than half full
    rig.watcher = first  # the first takes the term back, in the same process
    resyncs = rig.resyncs("b")
    rig.start()
    rig.settle()
    assert granted <= first.targets[0].control.leases.known  # kept alive from now on
    assert rig.resyncs("b") == resyncs  # resumed from the fences
    assert_map_matches(rig, "b")


def test_a_resync_keeps_every_lease_within_1000_keys() -> None:
    """Keys a resync writes again (here, those of a lease that ended) go on leases by the
    counts the watcher had, not by those of a listing that has not reached the rest."""
    rig = Rig(cache_lease_ttl=TTL)
    fill(rig, 600)
    for start in range(0, 1000, 120):
        rig.source.txn(
            [], [Put(NODE + b"node-%d" % i, b"{}") for i in range(start, min(1000, start + 120))]
        )
    rig.start()
    rig.settle()
    target = rig.mesh["b"]
    _, kvs = target.scan(b"cilium/cache/nodes/")
    target.revoke_lease(next(kv.lease for kv in kvs))  # most of the nodes go with it
    rig.watcher.keep_leases_once()
    rig.settle()
    assert rig.resyncs("b", Cause.LEASE_EXPIRED.value) == 1
    assert rig.cache("b") == rig.expected()
    assert max(leases_of(target).values()) <= MAX_KEYS_PER_LEASE
    assert_map_matches(rig, "b")


def test_a_resync_corrects_the_map_from_what_the_target_holds() -> None:
    """A resync's listing moves a key the map had elsewhere to the lease it found it on,
    and drops one it found on a lease not the watcher's; when it ends, keys the map placed
    by batches that never landed, and that it neither found nor wrote, are dropped, and a
    lease left empty is retired with the resync's chain. A resync that failed changes
    nothing but what its listing found."""
    _, leases = target_leases()
    keys = [b"cilium/cache/nodes/v1/a/n%d" % i for i in range(MAX_KEYS_PER_LEASE)]
    canary = canary_key("a", RESOURCE_BY_NAME["nodes"])
    full = leases.take(keys, [], 1, {"s0": (10, 0)})
    other = leases.take([b"cilium/cache/nodes/v1/a/x", canary], [], 1, {"s0": (11, 0)})
    assert other != full and leases.count == {full: 1000, other: 2}
    for failed in (True, False):
        leases.relist()
        leases.note(keys[0], other)  # the listing found it on the other lease
        leases.note(keys[1], 99)  # on a lease not the watcher's: written again
        assert leases.where[keys[0]] == other and keys[1] not in leases.where
        assert leases.take([keys[2]], [], 2, {"s0": (20, 0)}) == other  # the resync writes it
        leases.settle(2, None if failed else {"s0": (21, 0)})
        if failed:  # nothing else dropped: the next resync corrects it
            assert leases.count == {full: 997, other: 4}
            assert not leases.retired
    # what the listing found (keys[0]) and wrote (keys[2]), and the canary (never listed)
    assert leases.where == dict.fromkeys([keys[0], keys[2], canary], other)
    assert leases.count == {full: 0, other: 3}
    assert leases.retired == {full: (2, {"s0": (21, 0)})}


def test_an_ended_lease_is_remembered_until_a_resync_rewrote_its_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record of a lease found ended stays until a resync has written its keys again:
    a load that fails half way, or a watcher that dies before the resync, leaves the next
    one the same evidence, and it resyncs instead of resuming without those keys."""
    etcd, leases = target_leases()
    keys = [b"cilium/cache/nodes/v1/a/n%d" % i for i in range(MAX_KEYS_PER_LEASE)]
    ended = leases.take(keys, [], 1, {"s0": (10, 0)})
    kept = leases.take([b"cilium/cache/nodes/v1/a/x"], [], 1, {"s0": (11, 0)})
    # the records are read in that order
    assert etcd.keys(lease_prefix("a")) == [lease_key("a", ended), lease_key("a", kept)]
    for lease in (ended, kept):
        etcd.txn([], [Put(b"cilium/cache/nodes/v1/a/y%d" % lease, b"v", lease)])
    etcd.revoke_lease(ended)
    real = etcd.lease_keys

    def fails_at_kept(lease: int) -> list[bytes] | None:
        if lease == kept:
            raise RetryableError("etcd b: unavailable", "b")
        return real(lease)

    monkeypatch.setattr(etcd, "lease_keys", fails_at_kept)
    leases.reset()  # a new term, whose load fails after it found the ended lease
    with pytest.raises(RetryableError):
        leases.ensure_loaded()
    assert leases.lost.is_set()
    assert not leases.loaded  # the main loop's start loads again
    monkeypatch.setattr(etcd, "lease_keys", real)
    record = lease_key("a", ended)
    for resynced in (False, True):  # the next watcher finds the same, until a resync
        nxt = TargetLeases(etcd, "a", TTL)
        assert nxt.load() is False
        assert nxt.gone == {ended} and nxt.known == {kept}
        assert record in etcd.keys(lease_prefix("a"))
        nxt.relist()
        nxt.settle(2, {"s0": (20, 0)} if resynced else None)
    assert record not in etcd.keys(lease_prefix("a"))
    assert TargetLeases(etcd, "a", TTL).load() is True
    # one found ended while a resync lists waits for the next: the listing may have passed
    # its keys before they went
    nxt = TargetLeases(etcd, "a", TTL)
    assert nxt.load() is True
    nxt.relist()
    etcd.revoke_lease(kept)
    nxt.keep_alive()
    assert nxt.lost.is_set() and nxt.gone == {kept}
    nxt.settle(3, {"s0": (30, 0)})
    assert nxt.gone == {kept}
    assert lease_key("a", kept) in etcd.keys(lease_prefix("a"))


def test_a_lease_revoked_during_a_keepalive_round_is_not_taken_for_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    etcd, leases = target_leases()
    first = emptied_lease(leases)
    assert first in leases.retired
    real = etcd.keepalive

    def collect_first(lease: int) -> int:  # the fence poll revokes it meanwhile
        if lease == first:
            leases.collect(lambda gen, chain: True, 1, {"s0": (3, 0)})
        return real(lease)

    monkeypatch.setattr(etcd, "keepalive", collect_first)
    leases.keep_alive()
    assert first not in leases.known  # revoked
    assert not leases.lost.is_set() and not leases.gone


def test_a_lease_whose_record_cannot_be_deleted_is_not_revoked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record goes before the revoke: a record left behind would read, at the next
    load, as a lease that ended with its keys, and cost a resync."""
    etcd, leases = target_leases()
    first = emptied_lease(leases)
    real = etcd.txn

    def refuses_deletes(compares: Any, ops: Any, failure: Any = ()) -> Any:
        if any(isinstance(op, Delete) for op in ops):
            raise RetryableError("etcd b: unavailable", "b")
        return real(compares, ops, failure)

    monkeypatch.setattr(etcd, "txn", refuses_deletes)
    leases.collect(lambda gen, chain: True, 1, {"s0": (3, 0)})
    assert first in leases.retired and etcd.keepalive(first) > 0  # kept for the next poll
    monkeypatch.setattr(etcd, "txn", real)
    leases.collect(lambda gen, chain: True, 1, {"s0": (3, 0)})
    assert first not in leases.known and etcd.keepalive(first) == 0
    assert lease_key("a", first) not in etcd.keys(lease_prefix("a"))
    assert TargetLeases(etcd, "a", TTL).load() is True


def test_the_records_decide_by_the_keys_on_the_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases left empty need no resync with leases off (they are revoked); with leases on,
    a synced target whose leases hold no key needs one (its keys sit on none). A key that
    moved between the looks at two leases counts once, on the last."""
    etcd = MemoryEtcd("b")
    lease = etcd.grant_lease(TTL)
    etcd.txn([], [Put(lease_key("a", lease), b""), Put(gen_key("a"), b"1")])
    off = TargetLeases(etcd, "a", 0)
    assert off.load() is True and off.retired == {lease: None}
    off.collect(lambda gen, chain: True, 1, {})
    assert etcd.keepalive(lease) == 0 and not etcd.keys(lease_prefix("a"))
    first, second = etcd.grant_lease(TTL), etcd.grant_lease(TTL)
    for held in (first, second):
        etcd.txn([], [Put(lease_key("a", held), b"")])
    assert TargetLeases(etcd, "a", TTL).load() is False  # synced, and nothing on a lease
    etcd.txn([], [Put(b"cilium/cache/nodes/v1/a/n", b"v", second)])
    real = etcd.lease_keys
    moved = [b"cilium/cache/nodes/v1/a/n"]  # on the first lease when that one was looked at
    monkeypatch.setattr(etcd, "lease_keys", lambda held: moved if held == first else real(held))
    on = TargetLeases(etcd, "a", TTL)
    assert on.load() is True
    assert on.count == {first: 0, second: 1} and on.retired == {first: None}


def test_a_start_waits_for_another_threads_lease_load_as_long_as_for_a_call() -> None:
    """The keepalive thread may be reading a target's lease records (it loads those of a
    target the term has not loaded yet) when the loop's start, or a resync, needs them.
    The loop waits for it as long as for one of its calls (sync.loop_etcd_timeout), then
    goes on without that target, which stays owed a resync while the others are served;
    the target is resynced once its records can be read, and ends with every key on a
    lease."""
    rig = Rig(cache_lease_ttl=TTL, loop_etcd_timeout=0.05)
    fill(rig, 600)
    rig.start()
    rig.settle()
    rig.watcher = rig.new_watcher()  # a new term
    b, c = (next(t for t in rig.watcher.targets if t.name == n) for n in ("b", "c"))
    loading = b.control.leases._load_lock
    loading.acquire()  # the keepalive thread's load, under way
    try:
        rig.start()
        assert b.need_resync is not None and not b.control.leases.loaded
        assert c.need_resync is None and c.control.leases.loaded  # resumed meanwhile
        resyncs = rig.resyncs("b")
        rig.source.put(NODE + b"node-1", b"{}")
        rig.settle()  # the resyncs b is owed wait as long as a call too, and stay owed
        assert b.need_resync is not None and not b.control.leases.loaded
        assert rig.resyncs("b") == resyncs
        assert_map_matches(rig, "c")
    finally:
        loading.release()
    rig.clock.advance(60)  # past the resyncs' backoff
    rig.settle()
    assert rig.resyncs("b") > resyncs
    assert b.need_resync is None and b.control.leases.loaded
    assert_map_matches(rig, "b")
    assert_map_matches(rig, "c")
