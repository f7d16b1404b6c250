"""The fault suite's mesh: real etcd, Redis, watcher and worker processes, with a simulated
Cilium control plane churning in every cluster while a test runs.

One mesh is shared by the fault tests of this package: building one (servers, state, a first
full sync) costs more than most faults. Each test starts from a mesh that is exact, with the
baseline watcher and worker running and the churn on; it may kill, freeze or replace anything.
Afterwards the baseline processes are brought back and the mesh must be exact again; a mesh
that is not is thrown away and the next test gets a new one, so one broken test never fails
the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.tools.simulate import Simulator

from ..harness import Mesh, Proc, Servers, eventually, stop_procs, with_sigcont

FAULT_SYNC = {
    "drain_grace": 2,
    "drain_check_interval": 1,
    "watch_timeout": 5,
    "etcd_timeout": 4,
}
FAULT_WORKER = {"max_retry_delay": 2}


class Churn:
    """A simulator per source cluster, on threads; the churn runs only while resumed."""

    def __init__(self, mesh: Mesh, rate: float = 15.0, identities: int = 150) -> None:
        self.rate = rate
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
            sim.pause()
        self.threads = [
            threading.Thread(target=s.run, args=(rate, 0.0), daemon=True) for s in self.sims
        ]
        for t in self.threads:
            t.start()

    @property
    def ops(self) -> int:
        return sum(s.ops for s in self.sims)

    def resume(self) -> None:
        for s in self.sims:
            s.resume()

    def pause(self) -> None:
        for s in self.sims:
            s.pause()

    def close(self) -> None:
        for s in self.sims:
            s.stop()
        for t in self.threads:
            t.join(timeout=10)


class FaultMesh(Mesh):
    """A two-cluster mesh under churn, with one baseline watcher and one baseline worker.

    The visibility timeout is long on purpose: a task held by a killed or frozen worker comes
    back only after it, so the recovery a test waits for is the one it means to exercise
    (stall detection and a resync), not a redelivery that may or may not come first."""

    def __init__(
        self,
        servers: Servers,
        sync: dict[str, Any] = FAULT_SYNC,
        etcd_args: dict[int, list[str]] | None = None,
    ) -> None:
        super().__init__(
            servers, sync=sync, etcd_args=etcd_args, visibility_timeout=60, worker=FAULT_WORKER
        )
        self.pristine_config = self.config.read_text()
        self.churn = Churn(self)
        self.base_worker: Proc | None = None
        self.base_watcher: Proc | None = None

    # -- the baseline pipeline ------------------------------------------------------------

    def start_worker(self) -> Proc:
        self.base_worker = self.worker("worker1")
        return self.base_worker

    def start_watcher(self) -> Proc:
        self.base_watcher = self.watcher("watch1")
        return self.base_watcher

    @property
    def watch(self) -> Proc:
        assert self.base_watcher is not None
        return self.base_watcher

    def begin(self) -> None:
        """The state every test starts from: baseline processes up, caches exact, churn on."""
        if self.base_worker is None or not self.base_worker.alive():
            self.start_worker()
        if self.base_watcher is None or not self.base_watcher.alive():
            self.start_watcher()
        self.wait_equal(120)
        # quiet: no task left over from before (one of an older generation, a duplicate), so
        # whatever a test finds in a queue was published during the test; nor one the base
        # worker holds, a retry waiting for its countdown, say: a test that stops that
        # worker would find it back at the head of its queue
        base = self.base_worker
        eventually(
            lambda: (
                all(self.queue_depth(n) == 0 for n in self.names)
                and (base is None or not self.held_by(base))
            ),
            timeout=120,
            what="empty queues, and nothing in the base worker's hands",
        )
        ops = self.churn.ops
        self.churn.resume()
        eventually(lambda: self.churn.ops >= ops + 5, timeout=60, what="the churn running")

    def end(self) -> None:
        """Undo what a test changed, then require the caches to be exact again."""
        self.churn.pause()
        for server in (self.redis, *self.etcds):
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        if self.config.read_text() != self.pristine_config:
            self.config.write_text(self.pristine_config)
        keep = {id(self.base_worker), id(self.base_watcher)}
        extra = [p for p in self.procs if id(p) not in keep]
        for p in extra:
            with_sigcont(p)
        stop_procs(extra)
        self.procs = [p for p in self.procs if id(p) in keep and p.alive()]
        self.begin()
        self.churn.pause()

    def settle(self, wait: float = 120) -> list[str]:
        """Stop the churn, then require every target to equal its source exactly."""
        self.churn.pause()
        return self.wait_equal(wait)


class SharedMesh:
    """Holds the package's mesh; builds a new one when the last one was left broken."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0
        self.servers: Servers | None = None
        self.mesh: FaultMesh | None = None

    def get(self) -> FaultMesh:
        if self.mesh is None:
            self.n += 1
            self.servers = Servers(self.root / f"mesh{self.n}")
            self.servers.root.mkdir(parents=True)
            self.mesh = FaultMesh(self.servers)
        return self.mesh

    def discard(self) -> None:
        if self.mesh is not None:
            self.mesh.churn.close()
            self.mesh.stop()
        if self.servers is not None:
            self.servers.stop_all()
        self.mesh, self.servers = None, None


@pytest.fixture(scope="package")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedMesh]:
    holder = SharedMesh(tmp_path_factory.mktemp("faults"))
    try:
        yield holder
    finally:
        holder.discard()


@pytest.fixture
def mesh(shared_mesh: SharedMesh) -> Iterator[FaultMesh]:
    """The shared mesh, exact and churning at the start of the test."""
    m = shared_mesh.get()
    try:
        m.begin()
    except BaseException:
        shared_mesh.discard()
        raise
    yield m
    try:
        m.end()
    except BaseException:
        shared_mesh.discard()
        raise


@pytest.fixture
def own_mesh(servers: Servers) -> Iterator[Callable[..., FaultMesh]]:
    """A mesh of the test's own, for faults that change what the shared one is made of."""
    made: list[FaultMesh] = []

    def make(**kwargs: object) -> FaultMesh:
        m = FaultMesh(servers, **kwargs)  # type: ignore[arg-type]
        made.append(m)
        m.begin()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.churn.close()
            m.stop()
