"""The fault suite's mesh: real etcd, Redis, watcher and worker processes, with a simulated
Cilium control plane churning in every cluster throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from pipeline.simulate import Simulator

from ..harness import Mesh, Servers

FAULT_SYNC = "\n".join(
    [
        "leader_ttl = 3",
        "drain_grace = 2",
        "drain_check_interval = 1",
    ]
)


class Churn:
    """A simulator per source cluster, churning on threads until stopped."""

    def __init__(self, mesh: Mesh, rate: float = 15.0, identities: int = 150) -> None:
        self.sims = [
            Simulator(
                mesh.etcds[i].cluster(name, i + 1),
                identities=identities,
                nodes=6,
                services=10,
                endpoints=round(identities * 1.55),
                lease_ttl=30,
                seed=i,
            )
            for i, name in enumerate(mesh.names)
        ]
        for sim in self.sims:
            sim.populate()
        self.threads = [
            threading.Thread(target=s.run, args=(rate, 0.0), daemon=True) for s in self.sims
        ]
        for t in self.threads:
            t.start()

    @property
    def ops(self) -> int:
        return sum(s.ops for s in self.sims)

    def stop(self) -> None:
        for s in self.sims:
            s.stop()
        for t in self.threads:
            t.join(timeout=10)


class FaultMesh(Mesh):
    def __init__(
        self,
        servers: Servers,
        sync: str = FAULT_SYNC,
        etcd_args: dict[int, list[str]] | None = None,
    ) -> None:
        super().__init__(servers, sync=sync, etcd_args=etcd_args)
        self.churn: Churn | None = None

    def start_churn(self, rate: float = 15.0) -> Churn:
        self.churn = Churn(self, rate)
        return self.churn

    def settle(self, wait: float = 120) -> str:
        """Stop the churn, then require every target to equal its source exactly."""
        if self.churn is not None:
            ops = self.churn.ops
            self.churn.stop()
            assert ops > 0, "the churn never ran"
        res = self.verify(wait)
        assert res.returncode == 0, res.stdout + res.stderr
        pairs = [ln for ln in res.stdout.splitlines() if " -> " in ln]
        assert pairs and all(": EQUAL:" in ln for ln in pairs), res.stdout
        return res.stdout


@pytest.fixture
def mesh(servers: Servers) -> Iterator[FaultMesh]:
    m = FaultMesh(servers)
    try:
        yield m
    finally:
        if m.churn is not None:
            m.churn.stop()
        m.stop()
