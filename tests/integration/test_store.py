"""The worker's target store against a real etcd: the compares a group transaction makes on
a guessed fence, and the views a failed one reads back."""

from __future__ import annotations

import pytest

from pipeline.clients.etcd import Etcd
from pipeline.protocol.fence import FenceRecord, GenRecord
from pipeline.protocol.layout import Op
from pipeline.protocol.names import fence_key, gen_key
from pipeline.protocol.wire import Operation
from workers.store import EtcdTargetStore, Part

from ..harness import Servers

pytestmark = pytest.mark.integration

KEY = b"cilium/cache/nodes/v1/a/n1"


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
