"""The simulator writes Cilium's layout and keeps it consistent through churn."""

from __future__ import annotations

import json

import pytest

from pipeline.tools.simulate import Simulator

from ..harness import Servers

pytestmark = pytest.mark.integration


def test_state_stays_consistent_through_churn(servers: Servers) -> None:
    """Every ipcache entry points at an existing identity, every value key at an existing
    ID, and no ID key outlives its last value key (garbage collection)."""
    etcd = servers.etcd()
    sim = Simulator(
        etcd.cluster("cluster-a", 3), identities=120, nodes=6, services=5, endpoints=200, seed=1
    )
    sim.populate()
    for _ in range(600):
        sim.step()
    e = sim.etcd
    ids = {k.rsplit(b"/", 1)[1]: v for k, v in e.items(b"cilium/state/identities/v1/id/").items()}
    values = e.items(b"cilium/state/identities/v1/value/")
    ipcache = e.items(b"cilium/state/ip/v1/default/")
    assert len(ids) > 50 and len(values) > len(ids) * 0.9 and len(ipcache) > 100
    referenced = set()
    for key, value in values.items():
        assert value in ids, key  # value keys name an existing identity
        labels = key[len(b"cilium/state/identities/v1/value/") :].rsplit(b"/", 1)[0]
        assert ids[value] == labels  # ... whose labels they carry
        referenced.add(value)
    assert referenced == set(ids)  # garbage collection: no ID without a value key
    for key, value in ipcache.items():
        entry = json.loads(value)
        assert str(entry["ID"]).encode() in ids, key
        assert key.endswith(entry["IP"].encode())
    assert all(int(i) >> 16 == 3 for i in ids)  # scoped by the cluster ID
    cfg = json.loads(e.get(b"cilium/cluster-config/cluster-a").value)  # type: ignore[union-attr]
    assert cfg["id"] == 3
    nodes = e.items(b"cilium/state/nodes/v1/cluster-a/")
    assert len(nodes) == 6


def test_value_keys_live_on_node_leases(servers: Servers) -> None:
    """Value keys are attached to their node's lease: revoking it removes them."""
    etcd = servers.etcd()
    sim = Simulator(
        etcd.cluster("cluster-a", 1), identities=30, nodes=2, services=1, endpoints=30, seed=2
    )
    sim.populate()
    before = sim.etcd.count(b"cilium/state/identities/v1/value/")
    sim.etcd.revoke_lease(sim.leases[0])
    after = sim.etcd.count(b"cilium/state/identities/v1/value/")
    assert 0 < after < before
    assert sim.etcd.count(b"cilium/state/identities/v1/id/") == 30
