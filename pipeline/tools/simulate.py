"""Play the Cilium agents and the clustermesh-apiserver of one cluster against its etcd.

It writes exactly the keys and value formats Cilium writes to `cilium/state/...`:
identities (ID keys with their label strings, IDs scoped by cluster ID), per-node identity
value keys on a lease per node that the simulator keeps alive (as each agent's session
lease), nodes, services, ipcache entries and the cluster config.

Churn is pods coming and going. A new pod takes an existing identity or allocates a new one;
its node gains the identity's value key if it had none; its IP gets an ipcache entry. A pod
that goes away removes its ipcache entry, the node's value key once no pod of that identity
is left on the node, and the identity's ID key once no value key refers to it (Cilium's
garbage collection). Once in a while a node restarts: its agent gets a new boot ID and a new
lease, its old lease is revoked (its value keys vanish) and its value keys are written again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.clients.etcd import Delete, Etcd, Put
from pipeline.config import WRITE, ClusterConfig
from pipeline.protocol.errors import RetryableError
from pipeline.tools.cilium_state import (
    cluster_config_value,
    identity_id,
    identity_labels,
    ipcache_value,
    node_ip,
    node_value,
    service_value,
    source_canaries,
)

log = logging.getLogger("kvmesh.simulate")

IDS = "cilium/state/identities/v1/id/"
VALUES = "cilium/state/identities/v1/value/"


@dataclass
class Pod:
    ip: str
    node: int
    local_id: int


@dataclass
class ClusterModel:
    """What the simulated cluster holds, mirrored in etcd."""

    name: str
    cluster_id: int
    nodes: int
    refs: dict[int, dict[int, int]] = field(default_factory=dict)  # local id -> node -> pods
    pods: dict[str, Pod] = field(default_factory=dict)
    boot: dict[int, int] = field(default_factory=dict)
    next_local: int = 0
    next_ip: int = 0

    def id_key(self, local: int) -> bytes:
        return f"{IDS}{identity_id(self.cluster_id, local)}".encode()

    def value_key(self, local: int, node: int) -> bytes:
        labels = identity_labels(self.name, local)
        return f"{VALUES}{labels}/{node_ip(self.cluster_id, node)}".encode()

    def node_key(self, node: int) -> bytes:
        return f"cilium/state/nodes/v1/{self.name}/node-{node}".encode()

    def new_ip(self) -> str:
        n = self.next_ip
        self.next_ip += 1
        return f"10.{self.cluster_id % 256}.{(n // 250) % 256}.{n % 250 + 2}"


class Simulator:
    def __init__(
        self,
        cluster: ClusterConfig,
        *,
        identities: int = 1100,
        nodes: int = 20,
        services: int = 50,
        endpoints: int = 1700,
        lease_ttl: int = 60,
        seed: int | None = None,
        etcd: Etcd | None = None,
    ) -> None:
        self.etcd = etcd or Etcd(cluster, role=WRITE)
        self.model = ClusterModel(cluster.name, cluster.id, max(1, nodes))
        self.rng = random.Random(seed)  # noqa: S311 - simulated workload, not secrets
        self.identities, self.services, self.endpoints = identities, services, endpoints
        self.lease_ttl = lease_ttl
        self.leases: dict[int, int] = {}
        self.ops = 0
        self.stop_event = threading.Event()
        self.churning = threading.Event()
        self.churning.set()

    # -- initial state ------------------------------------------------------------------------

    def populate(self, canaries: bool = True) -> None:
        """Write the cluster's initial state: about `identities` identities used by
        `endpoints` pods over `nodes` nodes (about 1.5 value keys per identity), then, as a
        clustermesh-apiserver does once it has written everything, its synced canaries
        (unless *canaries* is false: see write_canaries)."""
        m = self.model
        puts: list[tuple[bytes, bytes, int]] = []
        for n in range(m.nodes):
            self.leases[n] = self.etcd.grant_lease(self.lease_ttl)
            m.boot[n] = 0
            puts.append((m.node_key(n), node_value(m.name, m.cluster_id, n), 0))
        for s in range(self.services):
            ns, name = f"ns-{s % 7}", f"svc-{s}"
            puts.append(
                (
                    f"cilium/state/services/v1/{m.name}/{ns}/{name}".encode(),
                    service_value(m.name, ns, name, s),
                    0,
                )
            )
        for local in range(self.identities):
            m.refs[local] = {}
            m.next_local = local + 1
            puts.append((m.id_key(local), identity_labels(m.name, local).encode(), 0))
        # every identity gets one pod; the rest land on identities at random, so about half
        # of the identities span two nodes
        for i in range(max(self.endpoints, self.identities)):
            local = i if i < self.identities else self.rng.randrange(self.identities)
            puts += self._pod_puts(local, self.rng.randrange(m.nodes))
        puts.append(
            (f"cilium/cluster-config/{m.name}".encode(), cluster_config_value(m.cluster_id), 0)
        )
        if canaries:
            puts += [(k, v, 0) for k, v in source_canaries(m.name).items()]
        for i in range(0, len(puts), 127):
            self.etcd.txn(
                [],
                [Put(k, v, lease or 0) for k, v, lease in puts[i : i + 127]],
            )
        log.info("%s: wrote %d keys", m.name, len(puts))

    def write_canaries(self) -> None:
        """The synced canaries of every resource, as the apiserver writes them at the end."""
        self.etcd.txn([], [Put(k, v) for k, v in source_canaries(self.model.name).items()])

    def _pod_puts(self, local: int, node: int) -> list[tuple[bytes, bytes, int]]:
        m = self.model
        ip = m.new_ip()
        m.pods[ip] = Pod(ip, node, local)
        out: list[tuple[bytes, bytes, int]] = []
        on_node = m.refs.setdefault(local, {})
        if node not in on_node:
            out.append(
                (
                    m.value_key(local, node),
                    str(identity_id(m.cluster_id, local)).encode(),
                    self.leases[node],
                )
            )
        on_node[node] = on_node.get(node, 0) + 1
        ident = identity_id(m.cluster_id, local)
        out.append(
            (
                f"cilium/state/ip/v1/default/{ip}".encode(),
                ipcache_value(
                    ip, node_ip(m.cluster_id, node), ident, f"ns-{local % 7}", f"pod-{ip}"
                ),
                0,
            )
        )
        return out

    # -- churn --------------------------------------------------------------------------------

    def step(self) -> None:
        """One churn operation: mostly pods coming or going, now and then a node restart."""
        m = self.model
        r = self.rng.random()
        if r < 0.01:
            self._restart_node(self.rng.randrange(m.nodes))
        elif r < 0.5 + 0.5 * (self.endpoints - len(m.pods)) / max(self.endpoints, 1):
            self._add_pod()
        else:
            self._remove_pod()
        self.ops += 1

    def _add_pod(self) -> None:
        m = self.model
        if self.rng.random() < 0.3 or not m.refs:
            local = m.next_local
            m.next_local += 1
            m.refs[local] = {}
            self.etcd.put(m.id_key(local), identity_labels(m.name, local).encode())
        else:
            local = self.rng.choice(list(m.refs))
        puts = self._pod_puts(local, self.rng.randrange(m.nodes))
        self.etcd.txn([], [Put(k, v, lease or 0) for k, v, lease in puts])

    def _remove_pod(self) -> None:
        m = self.model
        if not m.pods:
            return
        pod = m.pods.pop(self.rng.choice(list(m.pods)))
        ops = [Delete(f"cilium/state/ip/v1/default/{pod.ip}".encode())]
        on_node = m.refs[pod.local_id]
        on_node[pod.node] -= 1
        if on_node[pod.node] == 0:
            del on_node[pod.node]
            ops.append(Delete(m.value_key(pod.local_id, pod.node)))
        if not on_node:  # garbage collection: nothing refers to the identity any more
            del m.refs[pod.local_id]
            ops.append(Delete(m.id_key(pod.local_id)))
        self.etcd.txn([], ops)

    def _restart_node(self, node: int) -> None:
        m = self.model
        old = self.leases[node]
        self.leases[node] = self.etcd.grant_lease(self.lease_ttl)
        self.etcd.revoke_lease(old)  # the agent's session ends: its value keys vanish
        m.boot[node] += 1
        value = node_value(m.name, m.cluster_id, node).replace(
            b'"BootID":"boot-', f'"BootID":"boot{m.boot[node]}-'.encode()
        )
        ops = [Put(m.node_key(node), value)]
        for local, on_node in m.refs.items():
            if node in on_node:
                ops.append(
                    Put(
                        m.value_key(local, node),
                        str(identity_id(m.cluster_id, local)).encode(),
                        self.leases[node],
                    )
                )
        for i in range(0, len(ops), 127):
            self.etcd.txn([], ops[i : i + 127])

    # -- running ------------------------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        while not self.stop_event.wait(max(1.0, self.lease_ttl / 4)):
            for lease in list(self.leases.values()):
                try:
                    self.etcd.keepalive(lease)
                except RetryableError as exc:
                    log.warning("%s: lease keepalive failed: %s", self.model.name, exc)

    def run(
        self, churn: float, duration: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Churn at *churn* operations per second for *duration* seconds (0: until stopped),
        keeping the leases alive; then keep them alive until stop() (or return at once if
        the duration ended)."""
        keepalive = threading.Thread(target=self._keepalive_loop, daemon=True)
        keepalive.start()
        start = clock()
        interval = 1.0 / churn if churn > 0 else None
        next_op = start
        try:
            while not self.stop_event.is_set():
                if duration and clock() - start >= duration:
                    return
                if interval is None or not self.churning.is_set():
                    self.stop_event.wait(0.2)
                    continue
                now = clock()
                if now < next_op:
                    self.stop_event.wait(next_op - now)
                    continue
                try:
                    self.step()
                except RetryableError as exc:
                    log.warning("%s: churn step failed: %s", self.model.name, exc)
                    self.stop_event.wait(0.5)
                next_op = max(next_op + interval, clock() - 1.0)
        finally:
            self.stop_event.set()
            keepalive.join(timeout=5)

    def pause(self) -> None:
        """Stop churning but keep the leases (the value keys) alive."""
        self.churning.clear()

    def resume(self) -> None:
        """Churn again after pause()."""
        self.churning.set()

    def stop(self) -> None:
        self.stop_event.set()
