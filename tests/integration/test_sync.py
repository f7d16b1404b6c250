"""The pipeline against real etcd and Redis: initial sync, changes, canaries, failures."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from pipeline.clients.etcd import Etcd
from pipeline.tools.cilium_state import identity_id, make_state, write_items

from ..harness import Mesh, eventually

pytestmark = pytest.mark.integration

VALUE = b"cilium/state/identities/v1/value/"


def seed(mesh: Mesh, identities: int = 300, endpoints: int = 200) -> list[dict[bytes, bytes]]:
    states = []
    for i, name in enumerate(mesh.names):
        state = make_state(
            name, i + 1, identities=identities, nodes=8, services=20, endpoints=endpoints, seed=i
        )
        write_items(mesh.client(i), state)
        states.append(state)
    return states


def assert_equal(mesh: Mesh, wait: float = 90) -> str:
    return "\n".join(mesh.wait_equal(wait))


def test_initial_sync_in_both_directions(mesh: Mesh) -> None:
    """Cilium-shaped state of each cluster lands in the other's cache, by identity ID only."""
    states = seed(mesh)
    mesh.worker()
    mesh.watcher()
    out = assert_equal(mesh)
    assert out.count("EQUAL") == 2
    for src, dst in ((0, 1), (1, 0)):
        target = mesh.client(dst)
        name = mesh.names[src]
        ids = sum(1 for k in states[src] if k.startswith(b"cilium/state/identities/v1/id/"))
        values = sum(1 for k in states[src] if k.startswith(VALUE))
        assert values > 0
        assert target.count(f"cilium/cache/identities/v1/{name}/id/".encode()) == ids
        assert target.count(f"cilium/cache/identities/v1/{name}/value/".encode()) == 0
        assert target.count(f"cilium/cache/identities/v1/{name}/".encode()) == ids
        assert target.count(f"cilium/cache/nodes/v1/{name}/".encode()) == 8
        assert target.count(f"cilium/cache/ip/v1/{name}/".encode()) == 200


def test_changes_propagate_byte_exactly(mesh: Mesh) -> None:
    """Puts, updates and deletes reach the target, with non-UTF-8 keys and empty values."""
    seed(mesh, identities=50, endpoints=50)
    mesh.worker()
    mesh.watcher()
    assert_equal(mesh)
    a, b = mesh.client(0), mesh.client(1)
    node = b"cilium/state/nodes/v1/cluster-a/\xffodd\x00node"
    a.put(node, b"\x80\x81 not utf-8")
    a.put(b"cilium/state/ip/v1/default/10.1.9.9", b"")
    a.put(b"cilium/state/services/v1/cluster-a/ns-1/svc-1", b'{"updated":true}')
    a.delete(b"cilium/state/nodes/v1/cluster-a/node-3")
    a.delete(f"cilium/state/identities/v1/id/{identity_id(1, 7)}".encode())
    want = {
        b"cilium/cache/nodes/v1/cluster-a/\xffodd\x00node": b"\x80\x81 not utf-8",
        b"cilium/cache/ip/v1/cluster-a/10.1.9.9": b"",
        b"cilium/cache/services/v1/cluster-a/ns-1/svc-1": b'{"updated":true}',
    }

    def landed() -> bool:
        got = {k: (kv.value if (kv := b.get(k)) else None) for k in want}
        gone = (
            b.get(b"cilium/cache/nodes/v1/cluster-a/node-3") is None
            and b.get(f"cilium/cache/identities/v1/cluster-a/id/{identity_id(1, 7)}".encode())
            is None
        )
        return got == want and gone

    eventually(landed, what="changes in cluster-b")
    assert_equal(mesh)


def test_value_keys_never_reach_a_target(mesh: Mesh) -> None:
    """Identity value keys written and rewritten in a source never appear in any target."""
    seed(mesh, identities=100)
    mesh.worker()
    mesh.watcher()
    a = mesh.client(0)
    for i in range(200):
        a.put(VALUE + f"k8s:app=churn-{i};/172.16.0.{i % 250}".encode(), str(70000 + i).encode())
    a.put(b"cilium/state/identities/v1/id/" + str(identity_id(1, 999)).encode(), b"k8s:x=y;")
    assert_equal(mesh)
    for dst in (0, 1):
        target = mesh.client(dst)
        for name in mesh.names:
            assert target.count(f"cilium/cache/identities/v1/{name}/value/".encode()) == 0


def test_canaries_follow_the_initial_sync_and_config_is_cached(mesh: Mesh) -> None:
    """A resource's canary appears only once its whole snapshot landed; the cluster config
    is copied with capabilities.cached = true."""
    states = seed(mesh, identities=2000, endpoints=1000)
    watcher = mesh.watcher()
    b = mesh.client(1)
    canary = b"cilium/synced/cluster-a/cilium/cache/identities/v1"
    eventually(
        lambda: (
            watcher.metric(
                "kvmesh_watcher_resyncs_total",
                source_cluster="cluster-a",
                target_cluster="cluster-b",
            )
            == 1
        ),
        what="the watcher's snapshot published",
    )
    assert b.get(canary) is None  # no worker yet: nothing landed, so no canary
    mesh.worker()
    eventually(lambda: b.get(canary) is not None, what="the identities canary")
    ids = sum(1 for k in states[0] if k.startswith(b"cilium/state/identities/v1/id/"))
    assert b.count(b"cilium/cache/identities/v1/cluster-a/id/") == ids
    for res in ("nodes", "services", "serviceexports", "ip", "identities"):
        key = f"cilium/synced/cluster-a/cilium/cache/{res}/v1".encode()
        kv = eventually(lambda key=key: b.get(key), what=f"canary {res}")
        assert kv.value.decode().endswith("Z")
    cfg = b.get(b"cilium/cluster-config/cluster-a")
    assert cfg is not None
    parsed = json.loads(cfg.value)
    assert parsed["id"] == 1 and parsed["capabilities"]["cached"] is True
    assert_equal(mesh)


def test_verify_detects_an_injected_difference(mesh: Mesh) -> None:
    """verify exits non-zero and names missing, extra and different keys."""
    seed(mesh, identities=30, endpoints=20)
    mesh.worker()
    watcher = mesh.watcher()
    assert_equal(mesh)
    watcher.stop()
    b: Etcd = mesh.client(1)
    b.delete(f"cilium/cache/identities/v1/cluster-a/id/{identity_id(1, 2)}".encode())
    b.put(b"cilium/cache/nodes/v1/cluster-a/ghost", b"{}")
    b.put(b"cilium/cache/services/v1/cluster-a/ns-1/svc-1", b"tampered")
    res = mesh.verify(wait=0)  # the CLI, once: its exit code and its report are under test
    assert res.returncode == 1
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("cluster-a -> cluster-b"))
    assert "DIFFERENT" in line and "missing 1, extra 1, different 1" in line
    assert "missing: cilium/cache/identities/v1/cluster-a/id/" in res.stdout
    assert "extra: cilium/cache/nodes/v1/cluster-a/ghost" in res.stdout
    assert "cluster-b -> cluster-a: EQUAL" in res.stdout


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_the_metrics_port_answers_health_readiness_and_nothing_else(mesh: Mesh) -> None:
    """/healthz answers while the watcher runs; /readyz is 503 with the reason until every
    target had its initial sync (which needs a worker), then 200; other paths are 404; the
    queue depth per source is a gauge."""
    seed(mesh)
    watcher = mesh.watcher()
    port = watcher.metrics_port
    assert port
    eventually(lambda: _get(port, "/healthz")[0] == 200, what="the metrics port")
    # each source's reason on its own: one watcher serves both, and either may still be
    # asking the broker for its lease while the other already waits for its initial sync
    eventually(
        lambda: (
            (r := _get(port, "/readyz"))[0] == 503
            and b"cluster-a: initial sync not done in cluster-b" in r[1]
        ),
        what="not ready before any worker runs, for cluster-a's initial sync",
    )
    depth = eventually(
        lambda: watcher.gauge("kvmesh_watcher_queue_depth", source_cluster="cluster-a"),
        what="the queue depth gauge",
    )
    assert depth > 0  # the snapshot waits for a worker
    for path in ("/", "/metricsx", "/healthz/x", "/api/v1"):
        assert _get(port, path)[0] == 404, path
    mesh.worker()
    eventually(lambda: _get(port, "/readyz")[0] == 200, what="ready after the initial sync")
    eventually(
        lambda: watcher.gauge("kvmesh_watcher_queue_depth", source_cluster="cluster-a") == 0,
        what="the queue drained",
    )
    assert_equal(mesh)


def test_worker_metrics_sum_every_pool_process(mesh: Mesh) -> None:
    """A prefork worker serves one set of Prometheus metrics for all its pool processes:
    the applied operations agree with the Redis stats hash every process adds to, the lag
    histogram counts the changes, and the port answers the probes; the watcher offers
    KVStoreMesh's metrics under kvmesh_."""
    seed(mesh, identities=50, endpoints=50)
    worker = mesh.worker(concurrency=2, metrics=True)
    watcher = mesh.watcher()
    port = worker.metrics_port
    assert port
    eventually(lambda: _get(port, "/readyz")[0] == 200, what="the worker ready")
    assert _get(port, "/healthz")[0] == 200
    assert _get(port, "/")[0] == 404
    assert worker.gauge("kvmesh_worker_concurrency") == 2
    assert_equal(mesh)
    a = mesh.client(0)
    for i in range(40):
        a.put(f"cilium/state/nodes/v1/cluster-a/metrics-{i}".encode(), b"{}")

    def agree() -> bool:
        for src, dst in mesh.pairs():
            applied = worker.metric(
                "kvmesh_worker_ops_applied_total", source_cluster=src, target_cluster=dst
            )
            if applied == 0 or applied != mesh.stats(src, dst).get("ops_applied"):
                return False
        return True

    eventually(lambda: assert_equal(mesh) and agree(), what="metrics agree with the stats")
    lag = worker.metric(
        "kvmesh_sync_lag_seconds_count", source_cluster="cluster-a", target_cluster="cluster-b"
    )
    assert lag >= 1  # the changes of the loop above, in as many batches as flushes
    assert watcher.gauge("kvmesh_remote_clusters") == 2  # this watcher syncs both sources
    # the canaries follow the data at the next fence poll: wait for them
    a_to_b = {"source_cluster": "cluster-a", "target_cluster": "cluster-b"}
    eventually(
        lambda: watcher.gauge("kvmesh_remote_cluster_readiness_status", **a_to_b) == 1,
        what="cluster-b ready for cluster-a",
    )
    written = {"scope": "nodes/v1", "action": "write", "source_cluster": "cluster-a"}
    assert watcher.gauge("kvmesh_kvstore_initial_sync_completed", **written) == 1
    assert (watcher.gauge("kvmesh_bootstrap_seconds", source_cluster="cluster-a") or 0) > 0
    # one change at a time, each a task of its own: from its second task on, a pool
    # process knows the generation and lands a batch next in its chain without a read
    b = mesh.client(1)
    held = worker.metric("kvmesh_worker_fence_guesses_total", outcome="held")
    for i in range(6):
        a.put(f"cilium/state/nodes/v1/cluster-a/one-{i}".encode(), b"{}")
        cached = f"cilium/cache/nodes/v1/cluster-a/one-{i}".encode()
        eventually(lambda k=cached: b.get(k) is not None, what=f"change {i} in cluster-b")
    eventually(
        lambda: worker.metric("kvmesh_worker_fence_guesses_total", outcome="held") > held,
        what="a batch landed on a guessed fence",
    )


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_worker_metrics_with_the_other_pools(mesh: Mesh, pool: str) -> None:
    """The solo and thread pools serve the metrics too (the solo pool signals a pool
    process start in the main process itself), with their real slot count: one for a solo
    worker asked for two, which says so (the warning is the feature)."""
    seed(mesh, identities=20, endpoints=20)
    worker = mesh.worker(concurrency=2, metrics=True, pool=pool)
    mesh.watcher()
    port = worker.metrics_port
    assert port
    eventually(lambda: _get(port, "/readyz")[0] == 200, what=f"the {pool} worker ready")
    assert worker.gauge("kvmesh_worker_concurrency") == (1 if pool == "solo" else 2)
    # what Celery was told (its gauge above says 1 for the solo pool whatever it is told)
    (celery,) = (a for a in worker.children_argv() if "celery" in " ".join(a))
    assert celery[celery.index("--concurrency") + 1] == ("1" if pool == "solo" else "2")
    assert ("--concurrency 2 does not apply" in worker.output()) == (pool == "solo")
    assert_equal(mesh)
    eventually(
        lambda: worker.metric("kvmesh_worker_ops_applied_total", source_cluster="cluster-a") > 0,
        what="ops counted",
    )
