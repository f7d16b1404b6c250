"""Every fault ends with each target exactly equal to its filtered source, byte for byte,
while a simulated control plane churns in every cluster.

Each test builds the condition its fault needs (a backlog, a task known to be in a worker's
hands, a change made while a process is down) and waits on state: Redis, the target's
records, the watchers' metrics and an in-process verify. No test waits on a log line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable

import pytest

from pipeline.source.listing import read_source, read_target

from ..harness import eventually, metric_values
from ..proxy import Proxy
from .conftest import FaultMesh, with_sigcont

pytestmark = pytest.mark.faults

A, B = "cluster-a", "cluster-b"
RESYNCS = "kvmesh_watcher_resyncs_total"
RESUMES = "kvmesh_watcher_resumes_total"
DRAIN_WAITS = "kvmesh_watcher_drain_waits_total"
INITIAL_SYNC = "kvmesh_watcher_initial_sync_completed"


def generations(mesh: FaultMesh) -> dict[tuple[str, str], int | None]:
    return {pair: mesh.gen(*pair) for pair in mesh.pairs()}


def read_target_keys_expected(mesh: FaultMesh) -> set[bytes]:
    """The target keys cluster-a's current state maps to."""
    settings = mesh.settings
    layout = settings.layout_of(settings.cluster(A))
    state = read_source(mesh.client(0), layout, page=1000, max_bytes=1 << 20)
    return set(state.items)


def put_and_wait(mesh: FaultMesh, name: bytes, value: bytes = b"{}") -> None:
    """Write a node into cluster-a and wait until cluster-b caches it."""
    a, b = mesh.client(0), mesh.client(1)
    a.put(b"cilium/state/nodes/v1/cluster-a/" + name, value)
    eventually(
        lambda: (kv := b.get(b"cilium/cache/nodes/v1/cluster-a/" + name)) and kv.value == value,
        timeout=60,
        what=f"node {name!r} cached in cluster-b",
    )


def test_worker_sigkilled_with_tasks_in_hand(mesh: FaultMesh) -> None:
    """A worker killed while it holds batches that have not landed loses nothing: the shards
    it left behind are found stalled and resynced, and the caches end exact."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    for i in range(2):
        mesh.backlog()
        victim, _, held = mesh.catch_in_hand(f"victim{i}")
        assert held
        victim.kill()
    mesh.start_worker()
    mesh.settle()


def test_worker_frozen_past_the_stall_timeout_is_superseded(mesh: FaultMesh) -> None:
    """A worker frozen (SIGSTOP) with a batch in hand for longer than the stall timeout is
    superseded by a new generation of the pair; when it thaws, its batches are obsolete and
    change nothing."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    mesh.backlog()
    frozen, proxies, held = mesh.catch_in_hand("frozen", concurrency=1)
    os.killpg(frozen.popen.pid, signal.SIGSTOP)
    for p in proxies:  # when it thaws, it reaches the target at once
        p.heal()
    before = generations(mesh)
    obsolete = {pair: mesh.stats(*pair).get("obsolete", 0) for pair in held}
    mesh.start_worker()
    eventually(
        lambda: all((mesh.gen(*pair) or 0) > (before[pair] or 0) for pair in held),
        timeout=60,
        what=f"a new generation of {sorted(held)}",
    )
    with_sigcont(frozen)
    eventually(
        lambda: all(mesh.stats(*pair).get("obsolete", 0) > obsolete[pair] for pair in held),
        timeout=60,
        what="the thawed worker's batches dropped as obsolete",
    )
    mesh.settle()


def test_watcher_sigkilled_and_restarted_resumes(mesh: FaultMesh) -> None:
    """A watcher killed once its progress records vouch for every fence, and restarted,
    resumes from its fences: no listing, nothing lost, including a change made while no
    watcher ran. (Killed with batches landed past its records, it lists again: see
    test_two_watchers_one_active_standby_takes_over, and tests/unit/test_lost_history.py.)"""
    mesh.churn.pause()
    eventually(
        lambda: all(mesh.recorded(*pair) for pair in mesh.pairs()),
        timeout=60,
        what="progress records that vouch for every fence",
    )
    mesh.watch.kill()
    mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/while-down", b"{}")
    w2 = mesh.start_watcher()
    eventually(lambda: w2.metric(RESUMES) == 2, timeout=60, what="both pairs resumed")
    mesh.settle()
    assert w2.metric(RESYNCS) == 0, w2.metrics()
    assert mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/while-down") is not None


def test_two_watchers_one_active_standby_takes_over(mesh: FaultMesh) -> None:
    """Of two watchers for the same sources one is active and the other waits; when the
    active one dies the standby takes over, opening exactly one generation per pair."""
    standby = mesh.watcher("watch2")
    eventually(
        lambda: all(standby.gauge("kvmesh_watcher_active", source_cluster=n) == 0 for n in (A, B)),
        timeout=60,
        what="the second watcher standing by",
    )
    before = generations(mesh)
    mesh.watch.kill()
    mesh.base_watcher = standby

    def took_over() -> bool:
        return all(
            standby.gauge("kvmesh_watcher_active", source_cluster=n) == 1 for n in (A, B)
        ) and all(
            standby.metric(RESUMES, source_cluster=s, target_cluster=t)
            + standby.metric(RESYNCS, source_cluster=s, target_cluster=t)
            == 1
            for s, t in mesh.pairs()
        )

    eventually(took_over, timeout=60, what="the standby active with one generation per pair")
    after = generations(mesh)
    assert all((after[p] or 0) > (before[p] or 0) for p in mesh.pairs()), (before, after)
    mesh.settle()
    assert generations(mesh) == after, "a generation changed after the takeover"
    assert standby.metric(RESUMES) + standby.metric(RESYNCS) == 2


def test_redis_lost_with_a_backlog(mesh: FaultMesh) -> None:
    """Every queued task is lost with Redis: the watcher's new term resumes from the fences,
    or the stalled shards are resynced, with no operator action."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    mesh.backlog()
    mesh.redis_client().set("test:sentinel", b"1")
    mesh.redis.kill()
    mesh.redis.start()
    assert mesh.redis_client().get("test:sentinel") is None, "Redis kept its data"
    mesh.start_worker()
    mesh.settle()


def test_target_etcd_sigkilled_and_restarted(mesh: FaultMesh) -> None:
    """Workers retry with backoff while the target is down; the backlog drains after."""
    before = mesh.stats(A, B).get("retry_unavailable", 0)
    mesh.etcds[1].kill()
    mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/while-b-down", b"{}")
    eventually(
        lambda: mesh.stats(A, B).get("retry_unavailable", 0) > before,
        timeout=60,
        what="a worker retrying against the dead target",
    )
    mesh.etcds[1].start()
    mesh.settle()
    assert mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/while-b-down") is not None


def test_target_etcd_wiped(mesh: FaultMesh) -> None:
    """A target restarted on an empty data dir is noticed and fully resynced, while its own
    cluster's state is written again, as its agents would."""
    resyncs = mesh.watch.metric(RESYNCS, source_cluster=A, target_cluster=B)
    sim_b = mesh.churn.sims[1]
    sim_b.pause()
    mesh.etcds[1].kill()
    shutil.rmtree(mesh.etcds[1].data_dir)
    mesh.etcds[1].data_dir.mkdir()
    mesh.etcds[1].start()
    sim_b.etcd = mesh.client(1)
    sim_b.model.pods.clear()
    sim_b.model.refs.clear()
    sim_b.populate()
    sim_b.resume()
    mesh.settle()
    assert mesh.watch.metric(RESYNCS, source_cluster=A, target_cluster=B) > resyncs


def test_source_etcd_restarted(mesh: FaultMesh) -> None:
    """The watch breaks when the source restarts and reconnects where it left off."""
    failures = mesh.watch.metric("kvmesh_watcher_source_failures_total", source_cluster=A)
    mesh.etcds[0].kill()
    mesh.etcds[0].start()
    eventually(
        lambda: (
            mesh.watch.metric("kvmesh_watcher_source_failures_total", source_cluster=A) > failures
        ),
        timeout=60,
        what="the broken watch noticed",
    )
    put_and_wait(mesh, b"after-restart")
    mesh.settle()


def test_watcher_stops_while_its_source_is_down(mesh: FaultMesh) -> None:
    """SIGTERM stops a watcher whose source etcd is down: the broken streams wait for their
    next look at the source without holding the watcher's loop, which sees the stop."""
    failures = "kvmesh_watcher_source_failures_total"
    before = mesh.watch.metric(failures, source_cluster=A)
    mesh.etcds[0].kill()
    # every stream of cluster-a broke, and the source was found unreachable again and again
    eventually(
        lambda: mesh.watch.metric(failures, source_cluster=A) >= before + 6,
        timeout=60,
        what="several failed looks at the source",
    )
    os.killpg(mesh.watch.popen.pid, signal.SIGTERM)
    try:
        code = mesh.watch.popen.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the watcher still ran 30 s after SIGTERM") from None
    assert code == 0
    mesh.etcds[0].start()


def test_source_compacted_while_the_watcher_is_down(mesh: FaultMesh) -> None:
    """History compacted away during the watcher's absence: list at one revision and diff."""
    mesh.watch.kill()
    a = mesh.client(0)
    a.put(b"cilium/state/nodes/v1/cluster-a/compacted-1", b"{}")  # history the fences lack
    a.delete(b"cilium/state/nodes/v1/cluster-a/compacted-1")
    a.compact(a.revision())
    w2 = mesh.start_watcher()
    eventually(
        lambda: w2.metric(RESYNCS, source_cluster=A, reason="compacted") >= 1,
        timeout=60,
        what="a resync for the compacted history",
    )
    mesh.settle()


def test_partitions_between_workers_and_target_and_watcher_and_source(mesh: FaultMesh) -> None:
    """Blackholed connections end in errors, not silent hangs, and everything converges once
    the network heals."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    mesh.watch.stop()
    to_target = Proxy(mesh.etcds[1].port)
    to_source = Proxy(mesh.etcds[0].port)
    try:
        text = mesh.config.read_text()
        worker_cfg = mesh.root / "worker.toml"
        worker_cfg.write_text(text.replace(mesh.etcds[1].url, to_target.url))
        watch_cfg = mesh.root / "watch.toml"
        watch_cfg.write_text(text.replace(mesh.etcds[0].url, to_source.url))
        mesh.start("worker", "--hostname", "pw@%h", log="pworker", config=worker_cfg)
        watcher = mesh.watcher("pwatch", config=watch_cfg)
        mesh.wait_equal()
        # worker -> target: a change that must go there finds the link dead, and is retried
        retries = mesh.stats(A, B).get("retry_unavailable", 0)
        to_target.blackhole()
        mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/partitioned", b"{}")
        eventually(
            lambda: mesh.stats(A, B).get("retry_unavailable", 0) > retries,
            timeout=90,
            what="the worker reporting the partition",
        )
        # watcher -> source: the silent watch is noticed and replaced
        failures = watcher.metric("kvmesh_watcher_source_failures_total", source_cluster=A)
        to_source.blackhole()
        eventually(
            lambda: (
                watcher.metric("kvmesh_watcher_source_failures_total", source_cluster=A) > failures
            ),
            timeout=90,
            what="the watcher reporting the partition",
        )
        to_target.heal()
        to_source.heal()
        mesh.settle()
    finally:
        to_target.close()
        to_source.close()


def test_source_removed_from_the_config_is_drained(own_mesh: Callable[..., FaultMesh]) -> None:
    """A source taken out of the config loses its cluster config in every target at once,
    and its cache, canaries and fences after the grace period."""
    mesh = own_mesh()
    b = mesh.client(1)
    assert b.count(b"cilium/cache/ip/v1/cluster-a/") > 0
    mesh.watch.stop()
    mesh.config.write_text(
        mesh.config.read_text().replace(
            'name = "cluster-a"\n', 'name = "cluster-a"\nsource = false\n'
        )
    )
    mesh.churn.sims[0].pause()
    mesh.start_watcher()

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

    eventually(drained, timeout=60, what="cluster-a drained from cluster-b")
    lines = mesh.settle()
    assert any(ln.startswith("cluster-b -> cluster-a: EQUAL") for ln in lines), lines
    assert not any(ln.startswith("cluster-a -> cluster-b") for ln in lines), lines


def test_watchers_whose_configs_differ_drain_nothing_the_other_syncs(mesh: FaultMesh) -> None:
    """A rolling update that adds a cluster runs watchers of the old and the new config side
    by side. Here each of two watchers has a config without the other's source: each sees
    that source cached in its targets and missing from its config, and leaves it alone
    while the other holds its lease. (The two start together: the first to be active may
    begin a drain before the other took its lease, which that one then ends by a resync;
    what is checked is what follows, once both are active.)"""
    mesh.watch.stop()
    text = mesh.config.read_text()
    only = {}
    for name, other in ((A, B), (B, A)):
        only[name] = mesh.config.with_name(f"only-{name}.toml")
        only[name].write_text(
            text.replace(f'name = "{other}"\n', f'name = "{other}"\nsource = false\n')
        )
    watchers = {A: mesh.watcher("watch-only-a", config=only[A])}
    watchers[B] = mesh.watcher("watch-only-b", config=only[B])
    other = {A: B, B: A}

    def waits() -> dict[str, float]:
        return {n: w.metric(DRAIN_WAITS, source_cluster=other[n]) for n, w in watchers.items()}

    eventually(
        lambda: all(
            w.gauge("kvmesh_watcher_active", source_cluster=n) == 1 for n, w in watchers.items()
        ),
        timeout=60,
        what="each watcher active for its source",
    )
    # a drain check that began before both were active is over once each has made one more
    before = waits()
    eventually(
        lambda: all(v > before[n] for n, v in waits().items()),
        timeout=60,
        what="a drain check by each watcher since both are active",
    )

    def synced() -> bool:
        return all(
            w.gauge(INITIAL_SYNC, source_cluster=n, target_cluster=other[n]) == 1
            for n, w in watchers.items()
        ) and all(
            mesh.client(i).get(f"kvmesh/{n}/draining".encode()) is None for i, n in ((0, B), (1, A))
        )

    eventually(synced, timeout=120, what="both pairs synced, with no drain record")
    opened = {n: w.metric(RESUMES) + w.metric(RESYNCS) for n, w in watchers.items()}
    before = waits()
    eventually(
        lambda: all(v >= before[n] + 2 for n, v in waits().items()),
        timeout=60,
        what="each watcher leaving the other's source alone twice more",
    )
    lines = mesh.settle()
    for s, t in ((A, B), (B, A)):
        assert any(ln.startswith(f"{s} -> {t}: EQUAL") for ln in lines), lines
    for i, name in ((0, B), (1, A)):
        target = mesh.client(i)
        assert target.get(f"cilium/cluster-config/{name}".encode()) is not None
        assert target.get(f"kvmesh/{name}/draining".encode()) is None
    # no drain began meanwhile: it would have made a watcher open another generation
    assert {n: w.metric(RESUMES) + w.metric(RESYNCS) for n, w in watchers.items()} == opened


def test_anti_entropy_repairs_unreported_drift(mesh: FaultMesh) -> None:
    """A cache key deleted by hand in a target is restored by the periodic resync."""
    mesh.watch.stop()
    ae = mesh.watcher("ae-watch", env={"KVMESH_SYNC_RESYNC_INTERVAL": "2"})
    mesh.settle()
    # the new watcher's term has begun and its start is behind it: what repairs the drift
    # below can then only be a resync it starts later
    eventually(
        lambda: (
            ae.gauge(
                "kvmesh_watcher_initial_sync_completed",
                source_cluster=A,
                target_cluster="cluster-b",
            )
            == 1
        ),
        what="the anti-entropy watcher in its term",
    )

    def resyncs() -> tuple[float, float]:
        # both figures from one scrape: a resync counted between two scrapes would show in
        # one figure and not the other
        samples = ae.metrics()
        pair = {"source_cluster": A, "target_cluster": "cluster-b"}
        total = sum(metric_values(samples, RESYNCS, **pair))
        return total, sum(metric_values(samples, RESYNCS, reason="anti_entropy", **pair))

    total, periodic = resyncs()
    b = mesh.client(1)
    key = next(iter(b.items(b"cilium/cache/nodes/v1/cluster-a/")))
    b.delete(key)
    # verify sees the drift, unless a resync that was already reading B repaired it first
    # (anti-entropy runs every 2 s here): then that resync is counted
    assert not mesh.verify_now()[0] or resyncs()[1] > periodic
    # consecutive resyncs are spaced out up to 64 s apart (watcher._space_resyncs)
    eventually(lambda: b.get(key) is not None, timeout=120, what="drift repaired")
    mesh.wait_equal()
    now_total, now_periodic = eventually(
        lambda: (r := resyncs())[1] > periodic and r, what="an anti-entropy resync counted"
    )
    assert now_total - total == now_periodic - periodic  # no resync of another cause


@pytest.mark.parametrize("watcher", ["watching", "stopped"])
def test_source_restored_from_a_copy_of_its_data(mesh: FaultMesh, watcher: str) -> None:
    """A source etcd back without the end of its history, under its cluster ID (its data dir
    restored from a copy here; an etcd before 3.5.5 that crashes can lose writes its
    watchers saw, which is the same), and pushed past the revision watched before any
    watcher looks: the new history reuses the lost revisions. What landed of the lost
    writes leaves every cache, whether the watcher watched through it or a new one
    starts (the one before stopped while the source was down). The watcher may look
    before the revision passes the one it saw, and tell by that alone; the in-memory
    tests (tests/unit/test_lost_history.py) make it look only after."""
    a_sim = mesh.churn.sims[0]
    a_sim.pause()
    mesh.wait_equal(120)

    def resynced() -> float:
        # a record that names the lost change says so; one that missed it (a target that
        # did not answer as the term ended) does not vouch for the fences past it
        return sum(
            mesh.watch.metric(RESYNCS, source_cluster=A, target_cluster=B, reason=reason)
            for reason in ("source_replaced", "unrecorded")
        )

    replaced = resynced()
    etcd = mesh.etcds[0]
    copy = mesh.root / "etcd-a-copy"
    shutil.rmtree(copy, ignore_errors=True)
    etcd.stop()
    shutil.copytree(etcd.data_dir, copy)
    etcd.start()
    a, b = mesh.client(0), mesh.client(1)
    lost = b"cilium/state/nodes/v1/cluster-a/lost-with-the-copy"
    a.put(lost, b"{}")
    back = sorted(k for k in a.keys(b"cilium/state/nodes/v1/cluster-a/") if k != lost)[0]
    a.delete(back)

    def cached(key: bytes) -> bool:
        return b.get(key.replace(b"cilium/state/", b"cilium/cache/", 1)) is not None

    eventually(
        lambda: cached(lost) and not cached(back), timeout=60, what="the changes to lose cached"
    )
    seen = a.revision()
    if watcher == "stopped":
        mesh.watch.stop()
    etcd.stop()
    shutil.rmtree(etcd.data_dir)
    shutil.copytree(copy, etcd.data_dir)
    etcd.start()
    a = mesh.client(0)
    while a.revision() <= seen + 2:  # other clusters' caches (nothing the watcher reads)
        a.put(b"cilium/cache/nodes/v1/elsewhere/node-0", b"{}")
    a.delete_prefix(b"cilium/cache/nodes/v1/elsewhere/")
    a_sim.etcd = a
    if watcher == "stopped":
        mesh.start_watcher()
        replaced = 0.0
    eventually(
        lambda: resynced() > replaced, timeout=90, what="the source that lost writes resynced"
    )
    mesh.settle()
    assert not cached(lost) and cached(back)


def test_source_restarted_empty_loses_no_cached_key_until_its_canaries(mesh: FaultMesh) -> None:
    """A clustermesh-apiserver's etcd restarts empty and is rebuilt under churn. Its config
    advertises synced canaries, so until it writes them again no cached key of it is
    deleted anywhere; once they are written, every target converges exactly."""
    a_sim = mesh.churn.sims[0]
    a_sim.pause()
    mesh.wait_equal(120)
    before = set(read_target(mesh.client(1), A, page=1000))
    replaced = mesh.watch.metric(
        RESYNCS, source_cluster=A, target_cluster=B, reason="source_replaced"
    )
    seen = mesh.client(0).revision()
    mesh.etcds[0].kill()
    shutil.rmtree(mesh.etcds[0].data_dir)
    mesh.etcds[0].data_dir.mkdir()
    mesh.etcds[0].start()
    # Its revision is pushed past the one watched, as the other clusters' watchers do when
    # they fill their caches in it: the watcher (looking once a second) notices the empty
    # etcd whether it reconnects before (by the revision) or after (by the key it last saw
    # written). With the revision check alone, a young mesh failed here.
    empty = mesh.client(0)
    for i in range(seen + 1):
        empty.put(b"cilium/cache/nodes/v1/elsewhere/node-%d" % i, b"{}")
    empty.delete_prefix(b"cilium/cache/nodes/v1/elsewhere/")
    # the empty source is noticed and resynced: everything it lacks is held, not deleted
    eventually(
        lambda: (
            mesh.watch.metric(RESYNCS, source_cluster=A, target_cluster=B, reason="source_replaced")
            > replaced
        ),
        timeout=90,
        what="the replaced source resynced",
    )
    assert set(read_target(mesh.client(1), A, page=1000)) == before
    # rebuilt slowly, without canaries yet, and churning
    a_sim.etcd = mesh.client(0)
    a_sim.model.pods.clear()
    a_sim.model.refs.clear()
    a_sim.populate(canaries=False)
    rebuilt = read_target_keys_expected(mesh)
    eventually(
        lambda: rebuilt <= set(read_target(mesh.client(1), A, page=1000)),
        timeout=90,
        what="the rebuilt keys cached in cluster-b",
    )
    ops = mesh.churn.ops
    a_sim.resume()
    eventually(lambda: mesh.churn.ops >= ops + 30, timeout=60, what="churn on the rebuilt source")
    for resource in ("nodes", "services", "ipcache", "identities"):
        waiting = mesh.watch.metric(
            "kvmesh_watcher_waiting_source_canary", source_cluster=A, resource=resource
        )
        assert waiting == 1, resource
    assert before <= set(read_target(mesh.client(1), A, page=1000))  # nothing lost
    assert mesh.watch.metric("kvmesh_watcher_held_deletes_total", source_cluster=A) > 0
    a_sim.write_canaries()
    mesh.settle()  # exact, stale keys gone
    assert (
        mesh.watch.metric(
            "kvmesh_watcher_waiting_source_canary", source_cluster=A, resource="nodes"
        )
        == 0
    )
