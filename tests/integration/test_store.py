"""The worker's target store against a real etcd: the compares a group transaction makes on
a guessed fence, and the views a failed one reads back; what the target refuses, for its
size or for want of space."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from pipeline.clients.etcd import Etcd, Get, Put, Writes
from pipeline.protocol.errors import RefusedError, RequestTooLargeError, RetryableError
from pipeline.protocol.fence import Decision, FenceRecord, GenRecord
from pipeline.protocol.layout import Op
from pipeline.protocol.names import fence_key, gen_key, rejected_key, rejected_prefix
from pipeline.protocol.wire import Batch, Operation
from pipeline.tools.servers import free_port
from workers.applier import apply_batch
from workers.store import EtcdTargetStore, Part

from ..harness import Servers, eventually

pytestmark = pytest.mark.integration

KEY = b"cilium/cache/nodes/v1/a/n1"
QUOTA = 1 << 20  # bytes of backend the out-of-space target may hold
FILLER = b"f" * 60_000


def test_exists_asks_for_a_count_now_or_at_a_revision(servers: Servers) -> None:
    """Etcd.exists: whether a key is there, now or at a past revision, without its value."""
    etcd = Etcd(servers.etcd().cluster("b", 2), timeout=5)
    etcd.put(KEY, FILLER)
    rev = etcd.revision()
    assert etcd.exists(KEY) and etcd.exists(KEY, rev)
    assert not etcd.exists(KEY + b"/more") and not etcd.exists(KEY[:-1])
    etcd.delete(KEY)
    assert not etcd.exists(KEY) and etcd.exists(KEY, rev)


def test_a_guessed_fence_is_compared_by_value_and_a_miss_reads_the_fences_back(
    servers: Servers,
) -> None:
    etcd = Etcd(servers.etcd().cluster("b", 2), timeout=5)
    store = EtcdTargetStore(etcd)
    etcd.put(gen_key("a"), GenRecord(1, 2, "id", 7).encode())
    etcd.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0)).encode())
    gen_rev = store.read_fences("a", ["nodes-0"])["nodes-0"].gen_rev
    put = (Operation(Op.PUT, KEY, b"v1"),)

    def part(shard: str, expect: FenceRecord, pos: tuple[int, int]) -> Part:
        return Part(shard, 0, put, FenceRecord(1, pos), expect=expect.encode())

    # a wrong guess (the fence is at (10, 0)), and a fence that does not exist: nothing is
    # written, and the failed transaction brings back what the target holds
    for shard, expect in [
        ("nodes-0", FenceRecord(1, (9, 0))),
        ("nodes-1", FenceRecord(1, (10, 0))),
    ]:
        landed, views = store.commit_group(
            "a", gen_rev, [part(shard, expect, (11, 0))], read_back=["nodes-0", "nodes-1"]
        )
        assert landed == 0
        assert etcd.get(KEY) is None
        assert views["nodes-0"].fence == FenceRecord(1, (10, 0))
        assert views["nodes-0"].fence_rev > 0 and views["nodes-0"].gen == 1
        assert views["nodes-1"].fence is None and views["nodes-1"].fence_rev == 0
    # the right guess lands, and returns the revision it wrote at
    landed, views = store.commit_group(
        "a", gen_rev, [part("nodes-0", FenceRecord(1, (10, 0)), (11, 0))], read_back=["nodes-0"]
    )
    assert landed > 0 and views == {}
    got = etcd.get(KEY)
    assert got is not None and got.value == b"v1"
    after = store.read_fences("a", ["nodes-0"])["nodes-0"]
    assert after.fence == FenceRecord(1, (11, 0)) and after.fence_rev == landed
    # a generation that moved fails the compare even when the fence guess is right
    etcd.put(gen_key("a"), GenRecord(2, 2, "id", 7).encode())
    landed, views = store.commit_group(
        "a", gen_rev, [part("nodes-0", FenceRecord(1, (11, 0)), (12, 0))], read_back=["nodes-0"]
    )
    assert landed == 0 and views["nodes-0"].gen == 2


def _target(servers: Servers, *args: str) -> tuple[Etcd, EtcdTargetStore]:
    """A target etcd started with *args*, holding source a's generation (one shard per
    resource: every node key is in nodes-0) and the fence of nodes-0 at (10, 0)."""
    etcd = Etcd(servers.etcd(list(args)).cluster("b", 2), timeout=5)
    etcd.put(gen_key("a"), GenRecord(1, 1, "id", 7).encode())
    etcd.put(fence_key("a", "nodes-0"), FenceRecord(1, (10, 0)).encode())
    return etcd, EtcdTargetStore(etcd)


def _batch(*ops: Operation) -> Batch:
    return Batch("a", "b", "nodes-0", 1, (10, 0), (11, 0), ops)


def test_a_target_out_of_space_keeps_its_keys_and_the_batch_waits(servers: Servers) -> None:
    """etcd answers RESOURCE_EXHAUSTED both for a backend over its quota ("database space
    exceeded", which still lets deletes through) and for a message over gRPC's limit. Only
    the second is a write too large: a full target is one that cannot write now, so the
    batch is retried later, and no key is deleted in its place."""
    etcd, store = _target(servers, "--quota-backend-bytes", str(QUOTA))
    keys = [f"cilium/cache/nodes/v1/a/node-{i}".encode() for i in range(3)]
    for k in keys:
        etcd.put(k, b"old")
    # fill the backend until etcd raises its no-space alarm (its size grows as the backend
    # commits, every 100 ms by default: one put per poll)
    written = iter(range(1 << 20))

    def full() -> bool:
        try:
            etcd.put(b"filler/%d" % next(written), FILLER)
        except RetryableError as exc:
            return "space exceeded" in str(exc)  # anything else: the next poll tries again
        return False

    eventually(full, timeout=60, what="the target's no-space alarm")
    batch = _batch(*(Operation(Op.PUT, k, b"new") for k in keys))
    with pytest.raises(RetryableError, match="space exceeded"):
        apply_batch(store, batch)
    assert [kv.value if (kv := etcd.get(k)) else None for k in keys] == [b"old"] * 3
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (10, 0))


def test_what_the_target_refuses_for_its_size_is_skipped_and_recorded(servers: Servers) -> None:
    """A target with a small --max-request-bytes: a value it cannot take, and a key too
    large for even its delete, are each skipped and recorded (under a name of fixed size);
    the rest of the batch lands and the fence moves. A request over gRPC's own limit
    (etcd's plus 512 KiB) is refused for its size as well."""
    etcd, store = _target(servers, "--max-request-bytes", "4096")
    small = [f"cilium/cache/nodes/v1/a/node-{i}".encode() for i in range(20)]
    big_value = b"cilium/cache/nodes/v1/a/big-value"
    long_key = b"cilium/cache/nodes/v1/a/" + b"k" * 5000
    etcd.put(big_value, b"old")
    ops = (
        *(Operation(Op.PUT, k, b"x" * 100) for k in small),
        Operation(Op.PUT, big_value, b"y" * 5000),
        Operation(Op.PUT, long_key, b"z"),
    )
    refused: list[bytes] = []
    decision = apply_batch(store, _batch(*ops), on_reject=lambda op, _r: refused.append(op.key))
    assert decision is Decision.APPLY
    assert refused == [big_value, long_key]
    assert all(etcd.get(k) is not None for k in small)
    assert etcd.get(big_value) is None  # its stale value deleted
    assert store.read_fence("a", "nodes-0").fence == FenceRecord(1, (11, 0))
    assert set(etcd.items(rejected_prefix("a"))) == {
        rejected_key("a", big_value),
        rejected_key("a", long_key),
    }
    with pytest.raises(RequestTooLargeError, match="too large"):
        etcd.txn([], [Put(b"kvmesh/x", b"v" * 5000)])
    with pytest.raises(RequestTooLargeError, match="larger than max"):
        etcd.txn([], [Put(b"kvmesh/x", b"v" * 600_000)])


def test_a_writer_takes_the_next_endpoint_when_its_own_is_down(servers: Servers) -> None:
    """Transactions go to the client library's stubs directly, past the wrapper that moves
    to another endpoint when one fails: the client moves on itself, so a target cluster
    with one member down still takes every worker's writes."""
    live = servers.etcd()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = replace(live.cluster("b", 2), endpoints=(f"http://{dead}", live.url))
    etcd = Etcd(cfg, timeout=5)
    etcd._client._current_endpoint_label = dead  # the library picks one at random
    with pytest.raises(RetryableError):
        etcd.txn([], [Put(b"kvmesh/x", b"1")])
    eventually(
        lambda: _answered(lambda: etcd.txn([], [Put(b"kvmesh/x", b"2")])),
        timeout=10,
        what="a transaction through the live endpoint",
    )
    for i in range(5):  # and it stays there
        etcd.txn([], [Put(b"kvmesh/x", b"%d" % i)])
    kv = etcd.get(b"kvmesh/x")
    assert kv is not None and kv.value == b"4"
    # the calls the library wraps (reads, leases) move on the same way
    etcd._client.endpoints[dead].last_failed = 0
    etcd._client._current_endpoint_label = dead
    with pytest.raises(RetryableError):
        etcd.get(b"kvmesh/x")
    reads = eventually(lambda: _answered(lambda: etcd.get(b"kvmesh/x")), timeout=10, what="a read")
    assert reads.value == b"4"
    etcd.close()


def test_a_target_taking_fewer_operations_refuses_as_only_its_operator_can_cure(
    servers: Servers,
) -> None:
    """A target whose --max-txn-ops is under what kvmesh sends refuses the transaction:
    a RefusedError (retry_refused in the worker), not a size to split or an etcd down."""
    server = servers.etcd(extra_args=["--max-txn-ops", "16"])
    etcd = Etcd(server.cluster("b", 2), timeout=5)
    etcd.txn([], [Put(b"kvmesh/%d" % i, b"v") for i in range(16)])
    with pytest.raises(RefusedError, match="too many operations"):
        etcd.txn([], [Put(b"kvmesh/%d" % i, b"v") for i in range(17)])
    # a Writes is one operation of etcd's per key it holds
    puts = [Operation(Op.PUT, b"kvmesh/%d" % i, b"w") for i in range(16)]
    etcd.txn([], [Writes(puts[:15]), Get(b"kvmesh/0")])
    with pytest.raises(RefusedError, match="too many operations"):
        etcd.txn([], [Writes(puts), Get(b"kvmesh/0")])
    etcd.close()


def test_a_transaction_of_writes_puts_deletes_and_reads_what_follows(servers: Servers) -> None:
    """A Writes in a transaction puts each item on its lease and deletes those without a
    value; the reads after it in the same branch come back in their order, matched with
    their own responses and not with the Writes' (one per key)."""
    etcd = Etcd(servers.etcd().cluster("b", 2), timeout=5)
    lease = etcd.grant_lease(60)
    etcd.put(b"kvmesh/gone", b"old")
    items = [
        Operation(Op.PUT, b"kvmesh/a", b"1"),
        Operation(Op.DELETE, b"kvmesh/gone"),
        Operation(Op.PUT, b"kvmesh/empty", b""),
    ]
    result = etcd.txn(
        [], [Get(b"kvmesh/gone"), Writes(items, lease), Get(b"kvmesh/a"), Get(b"kvmesh/none")]
    )
    assert result.succeeded
    before, after, none = result.reads
    assert before is not None and before.value == b"old"
    assert after is not None and (after.value, after.mod_revision) == (b"1", result.revision)
    assert none is None
    assert etcd.get(b"kvmesh/gone") is None
    assert len(etcd.lease_keys(lease) or []) == 2  # the two puts, and not the delete
    empty = etcd.get(b"kvmesh/empty")
    assert empty is not None and empty.value == b""
    etcd.close()


def test_an_ipv6_endpoint_is_reached(servers: Servers) -> None:
    """An endpoint written as an IPv6 URL (`http://[::1]:port`) reaches the etcd there."""
    try:  # a free port on IPv6 loopback, if this machine has one
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = servers.etcd(start=False)
    # the last --listen-client-urls counts: the server's own URL, and one on IPv6 loopback
    server.extra_args = ["--listen-client-urls", f"{server.url},http://[::1]:{port}"]
    server.start()
    etcd = Etcd(replace(server.cluster("b", 2), endpoints=(f"http://[::1]:{port}",)), timeout=5)
    etcd.put(b"kvmesh/v6", b"1")
    kv = etcd.get(b"kvmesh/v6")
    assert kv is not None and kv.value == b"1"
    etcd.close()


def _answered(call: Callable[[], Any]) -> Any:
    """What *call* returns, or None if the etcd did not answer it."""
    try:
        return call()
    except RetryableError:
        return None
