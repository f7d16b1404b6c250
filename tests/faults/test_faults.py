"""Every fault ends with each target exactly equal to its filtered source, byte for byte,
while a simulated control plane churns in every cluster throughout."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from pipeline.fence import GenRecord
from pipeline.layout import gen_key

from ..harness import Servers, eventually
from .conftest import FaultMesh
from .proxy import Proxy

pytestmark = pytest.mark.faults


def running(mesh: FaultMesh) -> None:
    """Start the churn and a pipeline, and wait for the first full sync under churn."""
    mesh.start_churn()
    mesh.worker("worker1")
    mesh.watcher("watch1")
    eventually(
        lambda: mesh.verify(0).returncode == 0 or None,
        timeout=90,
        interval=1,
        what="a first full sync",
    )


def test_worker_sigkilled_mid_batch(mesh: FaultMesh) -> None:
    """A worker killed with tasks in hand loses nothing; a new worker finishes the job."""
    running(mesh)
    for _ in range(3):
        w = mesh.worker("victim", concurrency=2)
        eventually(lambda w=w: "ready." in w.output(), what="victim ready")
        w.kill()
    mesh.settle()


def test_worker_stopped_past_the_stall_timeout(mesh: FaultMesh) -> None:
    """A worker frozen (SIGSTOP) with batches in hand for longer than the stall timeout is
    superseded by a resync; when it resumes, its batches are obsolete and change nothing."""
    running(mesh)
    frozen = mesh.worker("frozen", concurrency=1)
    eventually(lambda: "ready." in frozen.output(), what="frozen worker ready")
    eventually(lambda: "succeeded" in frozen.output(), what="the frozen worker working")
    os.killpg(frozen.popen.pid, signal.SIGSTOP)
    watch = mesh.procs[1]
    eventually(
        lambda: "stalled" in watch.output() or "requested by a worker" in watch.output(),
        timeout=60,
        what="the stall detected",
    )
    os.killpg(frozen.popen.pid, signal.SIGCONT)
    mesh.settle()


def test_watcher_sigkilled_and_restarted_resumes(mesh: FaultMesh) -> None:
    """A watcher killed and restarted resumes from its fences: no listing, nothing lost."""
    running(mesh)
    mesh.procs[1].kill()
    w2 = mesh.watcher("watch2")
    eventually(lambda: w2.output().count("resumes from the fences") == 2, timeout=30, what="resume")
    out = mesh.settle()
    assert "resynced at revision" not in w2.output(), w2.output()
    assert out


def test_two_watchers_one_active_standby_takes_over(mesh: FaultMesh) -> None:
    """Of two watchers for the same sources one is active, the other waits; when the active
    one dies the standby takes over within the lease TTL, and generations never ping-pong."""
    running(mesh)
    standby = mesh.watcher("watch2")
    eventually(lambda: standby.output().count("standby;") == 2, timeout=20, what="standby")
    gen_before = GenRecord.decode(mesh.client(1).get(gen_key("cluster-a")).value).gen  # type: ignore[union-attr]
    active = mesh.procs[1]
    assert "active" in active.output()
    active.kill()
    eventually(
        lambda: standby.output().count(": active (lease") == 2,
        timeout=3 + 5,
        what="takeover within the lease TTL",
    )
    gen_after = GenRecord.decode(mesh.client(1).get(gen_key("cluster-a")).value).gen  # type: ignore[union-attr]
    assert gen_after > gen_before
    # one takeover opened exactly one generation per pair: no ping-pong
    assert standby.output().count("cluster-a→cluster-b: generation") == 1, standby.output()
    mesh.settle()
    assert GenRecord.decode(mesh.client(1).get(gen_key("cluster-a")).value).gen == gen_after  # type: ignore[union-attr]


def test_redis_lost_and_restarted_empty(mesh: FaultMesh) -> None:
    """All queued tasks lost with Redis: the stalled fences are noticed and a resync (or the
    new term's replay from the fences) repairs them, with no operator action."""
    running(mesh)
    mesh.redis.kill()
    mesh.redis.start()
    mesh.settle()


def test_target_etcd_sigkilled_and_restarted(mesh: FaultMesh) -> None:
    """Workers retry with backoff while the target is down; the backlog drains after."""
    running(mesh)
    mesh.etcds[1].kill()
    eventually(
        lambda: "retry" in mesh.procs[0].output().lower(), timeout=30, what="workers retrying"
    )
    mesh.etcds[1].start()
    mesh.settle()


def test_target_etcd_wiped(mesh: FaultMesh) -> None:
    """A target restarted on an empty data dir is noticed and fully resynced (its own
    cluster's simulated state is written again, as agents would)."""
    running(mesh)
    assert mesh.churn is not None
    sim_b = mesh.churn.sims[1]
    sim_b.stop()
    mesh.etcds[1].kill()
    shutil.rmtree(mesh.etcds[1].data_dir)
    mesh.etcds[1].data_dir.mkdir()
    mesh.etcds[1].start()
    sim_b.etcd = mesh.client(1)
    sim_b.model.pods.clear()
    sim_b.model.refs.clear()
    sim_b.populate()
    eventually(
        lambda: (
            "lost its kvmesh records" in mesh.procs[1].output()
            or "no generation in target" in mesh.procs[1].output()
        ),
        timeout=30,
        what="the wipe noticed",
    )
    mesh.settle()


def test_source_etcd_restarted(mesh: FaultMesh) -> None:
    """The watch breaks when the source restarts and reconnects where it left off."""
    running(mesh)
    mesh.etcds[0].kill()
    mesh.etcds[0].start()
    eventually(
        lambda: "reconnecting" in mesh.procs[1].output(), timeout=30, what="the watch reconnecting"
    )
    mesh.settle()


def test_source_compacted_while_the_watcher_is_down(mesh: FaultMesh) -> None:
    """History compacted away during the watcher's absence: list at one revision and diff."""
    running(mesh)
    mesh.procs[1].kill()
    a = mesh.client(0)
    eventually(lambda: mesh.churn is not None and mesh.churn.ops > 50, what="churn")
    a.compact(a.revision())
    w2 = mesh.watcher("watch2")
    eventually(lambda: "compacted" in w2.output(), timeout=30, what="compaction seen")
    mesh.settle()


def test_partitions_between_workers_and_target_and_watcher_and_source(mesh: FaultMesh) -> None:
    """Blackholed connections end in errors, not silent hangs, and everything converges once
    the network heals."""
    mesh.start_churn()
    to_target = Proxy(mesh.etcds[1].port)
    to_source = Proxy(mesh.etcds[0].port)
    try:
        text = mesh.config.read_text()
        worker_cfg = mesh.root / "worker.toml"
        worker_cfg.write_text(text.replace(mesh.etcds[1].url, to_target.url))
        watch_cfg = mesh.root / "watch.toml"
        watch_cfg.write_text(text.replace(mesh.etcds[0].url, to_source.url))
        from ..harness import Proc

        worker = Proc(
            ["worker", "--config", str(worker_cfg), "--hostname", "pw@%h"],
            mesh.root / "pworker.log",
            mesh.env,
        )
        watcher = Proc(["watch", "--config", str(watch_cfg)], mesh.root / "pwatch.log", mesh.env)
        mesh.procs += [worker, watcher]
        eventually(
            lambda: mesh.verify(0).returncode == 0 or None,
            timeout=90,
            interval=1,
            what="a first full sync",
        )
        before_w, before_k = len(watcher.output()), len(worker.output())
        to_target.blackhole()
        to_source.blackhole()
        # neither side hangs silently: each reports the partition within a bounded time
        eventually(
            lambda: "failed" in watcher.output()[before_w:],
            timeout=45,
            what="the watcher reporting the partition",
        )
        eventually(
            lambda: "retrying" in worker.output()[before_k:],
            timeout=45,
            what="the workers reporting the partition",
        )
        to_target.heal()
        to_source.heal()
        mesh.settle()
    finally:
        to_target.close()
        to_source.close()


def test_source_removed_from_the_config_is_drained(mesh: FaultMesh) -> None:
    """A source taken out of the config loses its cluster config in every target at once,
    and its cache, canaries and fences after the grace period."""
    running(mesh)
    b = mesh.client(1)
    assert b.count(b"cilium/cache/ip/v1/cluster-a/") > 0
    mesh.procs[1].stop()
    mesh.config.write_text(
        mesh.config.read_text().replace(
            'name = "cluster-a"\n', 'name = "cluster-a"\nsource = false\n'
        )
    )
    assert mesh.churn is not None
    mesh.churn.sims[0].stop()
    mesh.watcher("watch2")

    def drained() -> bool:
        return (
            all(
                b.count(p) == 0
                for p in (
                    b"cilium/cache/nodes/v1/cluster-a/",
                    b"cilium/cache/ip/v1/cluster-a/",
                    b"cilium/cache/identities/v1/cluster-a/",
                    b"cilium/cache/services/v1/cluster-a/",
                    b"cilium/synced/cluster-a/",
                    b"kvmesh/cluster-a/",
                )
            )
            and b.get(b"cilium/cluster-config/cluster-a") is None
        )

    eventually(drained, timeout=30, what="cluster-a drained from cluster-b")
    out = mesh.settle()
    assert "cluster-b -> cluster-a: EQUAL" in out and "cluster-a -> cluster-b" not in out


def test_anti_entropy_repairs_unreported_drift(servers: Servers) -> None:
    """A cache key deleted by hand in a target is restored by the periodic resync."""
    mesh = FaultMesh(servers, sync="resync_interval = 3\nleader_ttl = 3")
    try:
        running(mesh)
        assert mesh.churn is not None
        mesh.churn.stop()
        assert mesh.verify(30).returncode == 0
        b = mesh.client(1)
        key = next(iter(b.items(b"cilium/cache/nodes/v1/cluster-a/")))
        b.delete(key)
        assert mesh.verify(0).returncode == 1
        eventually(lambda: b.get(key) is not None, timeout=3 + 5, what="drift repaired")
        assert mesh.verify(10).returncode == 0
        assert "(anti-entropy)" in mesh.procs[1].output()
    finally:
        mesh.stop()
