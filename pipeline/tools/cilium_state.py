"""Cilium-shaped state of one cluster, as its agents and clustermesh-apiserver write it to
`cilium/state/...`: identities (ID keys and per-node value keys), nodes, services, ipcache
entries and the cluster config. Used by the simulator, the tests and the benchmarks."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from pipeline.clients.etcd import Etcd, Put
from pipeline.protocol.layout import CLUSTER_ID_SHIFT, RESOURCES, source_canary_key

ID_BASE = 256  # Cilium allocates cluster-local identities from 256 up


def identity_id(cluster_id: int, local: int) -> int:
    return (cluster_id << CLUSTER_ID_SHIFT) | (ID_BASE + local)


def identity_labels(cluster: str, local: int) -> str:
    ns = f"ns-{local % 7}"
    return (
        f"k8s:app=app-{local};k8s:io.cilium.k8s.policy.cluster={cluster};"
        f"k8s:io.kubernetes.pod.namespace={ns};"
    )


def node_ip(cluster_id: int, n: int) -> str:
    return f"172.{16 + cluster_id % 16}.{n // 250}.{n % 250 + 2}"


def node_value(cluster: str, cluster_id: int, n: int) -> bytes:
    return json.dumps(
        {
            "Name": f"node-{n}",
            "Cluster": cluster,
            "IPAddresses": [{"Type": "InternalIP", "IP": node_ip(cluster_id, n)}],
            "IPv4AllocCIDR": {"IP": f"10.{cluster_id}.{n}.0", "Mask": "////AA=="},
            "IPv4HealthIP": f"10.{cluster_id}.{n}.134",
            "ClusterID": cluster_id,
            "Source": "custom-resource",
            "EncryptionKey": 0,
            "Labels": {},
            "BootID": f"boot-{cluster}-{n}",
        },
        separators=(",", ":"),
    ).encode()


def service_value(cluster: str, ns: str, name: str, i: int) -> bytes:
    return json.dumps(
        {
            "cluster": cluster,
            "namespace": ns,
            "name": name,
            "frontends": {
                f"172.20.{i // 250}.{i % 250 + 1}": {"port": {"protocol": "tcp", "port": 80}}
            },
            "backends": {
                f"10.0.{i // 250}.{i % 250 + 1}": {"http": {"protocol": "tcp", "port": 80}}
            },
            "labels": {},
            "selector": {"name": name},
        },
        separators=(",", ":"),
    ).encode()


def ipcache_value(ip: str, host_ip: str, identity: int, ns: str, pod: str) -> bytes:
    return json.dumps(
        {
            "IP": ip,
            "Mask": None,
            "HostIP": host_ip,
            "ID": identity,
            "Key": 0,
            "Metadata": "",
            "K8sNamespace": ns,
            "K8sPodName": pod,
            "K8sServiceAccount": "default",
        },
        separators=(",", ":"),
    ).encode()


def cluster_config_value(cluster_id: int) -> bytes:
    return json.dumps(
        {"id": cluster_id, "capabilities": {"syncedCanaries": True, "maxConnectedClusters": 255}},
        separators=(",", ":"),
    ).encode()


def source_canaries(cluster: str) -> dict[bytes, bytes]:
    """The synced canaries a clustermesh-apiserver writes into its own etcd once it has
    written each resource from Kubernetes (`cilium/synced/<c>/cilium/state/<res>/v1`)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    return {source_canary_key(cluster, r): stamp for r in RESOURCES if r.canary is not None}


def make_state(
    cluster: str,
    cluster_id: int,
    *,
    identities: int = 100,
    nodes: int = 5,
    services: int = 10,
    endpoints: int = 100,
    value_keys_per_identity: float = 1.5,
    seed: int = 0,
) -> dict[bytes, bytes]:
    """A consistent Cilium state: every ipcache entry refers to an identity and a node, and
    every identity has one value key per node that uses it (about value_keys_per_identity).
    Its cluster config advertises synced canaries, and the canaries come last."""
    rng = random.Random(seed)  # noqa: S311 - simulated data, not secrets
    out: dict[bytes, bytes] = {}
    ids = [identity_id(cluster_id, i) for i in range(identities)]
    for i, ident in enumerate(ids):
        labels = identity_labels(cluster, i)
        out[f"cilium/state/identities/v1/id/{ident}".encode()] = labels.encode()
        users = max(1, round(value_keys_per_identity + rng.uniform(-0.5, 0.5)))
        for n in rng.sample(range(max(nodes, 1)), min(users, max(nodes, 1))):
            key = f"cilium/state/identities/v1/value/{labels}/{node_ip(cluster_id, n)}"
            out[key.encode()] = str(ident).encode()
    for n in range(nodes):
        out[f"cilium/state/nodes/v1/{cluster}/node-{n}".encode()] = node_value(
            cluster, cluster_id, n
        )
    for s in range(services):
        ns, name = f"ns-{s % 7}", f"svc-{s}"
        out[f"cilium/state/services/v1/{cluster}/{ns}/{name}".encode()] = service_value(
            cluster, ns, name, s
        )
    for e in range(endpoints):
        ip = f"10.{cluster_id}.{e // 250}.{e % 250 + 10}"
        ident = ids[e % len(ids)] if ids else 0
        host = node_ip(cluster_id, e % max(nodes, 1))
        out[f"cilium/state/ip/v1/default/{ip}".encode()] = ipcache_value(
            ip, host, ident, f"ns-{e % 7}", f"pod-{e:05d}"
        )
    out[f"cilium/cluster-config/{cluster}".encode()] = cluster_config_value(cluster_id)
    out.update(source_canaries(cluster))  # after everything, as the apiserver writes them
    return out


def write_items(
    etcd: Etcd, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]], per_txn: int = 127
) -> None:
    """Write many keys quickly: transactions of up to 127 puts."""
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    for i in range(0, len(pairs), per_txn):
        etcd.txn([], [Put(k, v) for k, v in pairs[i : i + per_txn]])
