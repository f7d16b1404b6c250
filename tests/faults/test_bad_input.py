"""Bad input is reported with the key and the reason, counted, and never stops the pipeline
for everything else."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer, Queue

from pipeline.tools.cilium_state import identity_id

from ..harness import eventually
from .conftest import FaultMesh

pytestmark = pytest.mark.faults


def test_non_utf8_keys_values_and_empty_values_are_copied_exactly(mesh: FaultMesh) -> None:
    """Bytes that are not UTF-8, and empty values, land byte for byte."""
    a, b = mesh.client(0), mesh.client(1)
    a.put(b"cilium/state/nodes/v1/cluster-a/\xc3\x28\xff", b"\xfe\xff\x00\x01")
    a.put(b"cilium/state/services/v1/cluster-a/\x80ns/\x81svc", b"")
    a.put(b"cilium/state/ip/v1/default/\xf0\x28\x8c\x28", b"\xed\xa0\x80")
    mesh.settle()
    assert b.get(b"cilium/cache/nodes/v1/cluster-a/\xc3\x28\xff").value == b"\xfe\xff\x00\x01"  # type: ignore[union-attr]
    assert b.get(b"cilium/cache/services/v1/cluster-a/\x80ns/\x81svc").value == b""  # type: ignore[union-attr]
    assert b.get(b"cilium/cache/ip/v1/cluster-a/\xf0\x28\x8c\x28").value == b"\xed\xa0\x80"  # type: ignore[union-attr]


def test_value_larger_than_the_target_accepts(own_mesh: Callable[..., FaultMesh]) -> None:
    """A value over the target's request limit is reported with its key, counted and
    skipped; everything else syncs; verify lists it as rejected, not missing."""
    mesh = own_mesh(etcd_args={1: ["--max-request-bytes", "200000"]})
    a = mesh.client(0)
    big = b"cilium/state/services/v1/cluster-a/ns-1/huge"
    a.put(big, b"x" * 300_000)
    a.put(b"cilium/state/services/v1/cluster-a/ns-1/after", b"fine")
    lines = mesh.settle()
    out = "\n".join(lines)
    line = next(ln for ln in lines if ln.startswith("cluster-a -> cluster-b"))
    assert "missing 0" in line and "rejected 1" in line, out
    assert "rejected: cilium/cache/services/v1/cluster-a/ns-1/huge" in out
    b = mesh.client(1)
    assert b.get(b"cilium/cache/services/v1/cluster-a/ns-1/after") is not None
    assert b.get(b"cilium/cache/services/v1/cluster-a/ns-1/huge") is None
    assert mesh.base_worker is not None
    # the one-line error naming the key is the feature here
    worker = mesh.base_worker.output()
    assert "not synced: key cilium/cache/services/v1/cluster-a/ns-1/huge" in worker
    status = json.loads(mesh.cli("status", "--json").stdout)
    row = next(r for r in status if r["source"] == "cluster-a")
    assert row["workers"]["rejected_too_large"] >= 1
    # status counts as verify does: the refused key is rejected, not expected
    keys = int(line.split(": ")[2].split()[0])
    assert row["cached_keys"] == row["expected_keys"] == keys
    assert row["rejected_keys"] == 1


def test_keys_that_do_not_fit_the_layout_are_ignored_reported_and_counted(mesh: FaultMesh) -> None:
    """A malformed identity and another cluster's identity are not synced; the watcher logs
    each with its key and counts it; the rest of the mesh stays exact."""
    rejected = mesh.watch.metric(
        "kvmesh_watcher_rejected_total", source_cluster="cluster-a", reason="layout"
    )
    a = mesh.client(0)
    bad = b"cilium/state/identities/v1/id/not-a-number"
    foreign = f"cilium/state/identities/v1/id/{identity_id(5, 77)}".encode()
    a.put(bad, b"k8s:x=y;")
    a.put(foreign, b"k8s:x=y;")
    try:
        lines = mesh.settle()
        line = next(ln for ln in lines if ln.startswith("cluster-a -> cluster-b"))
        assert "rejected 2" in line
        # `status` gives verify's counts: every expected key cached, 2 rejected
        status = json.loads(mesh.cli("status", "--json").stdout)
        row = next(r for r in status if (r["source"], r["target"]) == ("cluster-a", "cluster-b"))
        keys = int(line.split(": ")[2].split()[0])
        assert row["cached_keys"] == row["expected_keys"] == keys, (row, line)
        assert row["rejected_keys"] == 2
        b = mesh.client(1)
        assert b.get(b"cilium/cache/identities/v1/cluster-a/id/" + foreign.split(b"/")[-1]) is None
        eventually(
            lambda: (
                mesh.watch.metric(
                    "kvmesh_watcher_rejected_total", source_cluster="cluster-a", reason="layout"
                )
                >= rejected + 2
            ),
            what="both keys counted",
        )
        # the one-line error naming the key is the feature here (written just after the
        # count)
        eventually(
            lambda: (
                "not synced: layout: key cilium/state/identities/v1/id/not-a-number"
                in (log := mesh.watch.output())
                and "belongs to cluster ID 5" in log
            ),
            what="both keys' one-line errors",
        )
    finally:
        a.delete(bad)
        a.delete(foreign)


def test_malformed_task_messages_are_rejected_and_the_worker_goes_on(mesh: FaultMesh) -> None:
    """A task whose payload does not decode, and a pickled message, are refused with a log
    line and counted; the worker keeps applying everything else."""
    before = mesh.stats("-", "-")
    queue = Queue(
        "kvmesh.cluster-a",
        Exchange("kvmesh.cluster-a", type="direct"),
        routing_key="kvmesh.cluster-a",
    )
    with Connection(mesh.redis.url) as conn:
        producer = Producer(conn)
        headers = {
            "lang": "py",
            "task": "kvmesh.apply_batch",
            "id": "bad-1",
            "retries": 0,
            "root_id": "bad-1",
            "parent_id": None,
            "group": None,
        }
        producer.publish(
            [["not", "a", "batch"], {}, {}],
            serializer="json",
            headers=headers,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
        )
        producer.publish(
            [[{"v": 1, "batches": [{"gen": "x"}]}], {}, {}],
            serializer="json",
            headers=dict(headers, id="bad-2", root_id="bad-2"),
            exchange=queue.exchange,
            routing_key=queue.routing_key,
        )
        producer.publish(
            {"evil": True},
            serializer="pickle",
            headers=dict(headers, id="bad-3", root_id="bad-3"),
            exchange=queue.exchange,
            routing_key=queue.routing_key,
        )
    worker = mesh.base_worker
    assert worker is not None
    # the first does not have the task's shape; the second is not even signed
    # the third is refused by Celery itself, counted by the worker's main process
    eventually(
        lambda: all(
            mesh.stats("-", "-").get(kind, 0) > before.get(kind, 0)
            for kind in ("malformed", "unsigned", "invalid_task")
        ),
        timeout=60,
        what="the malformed tasks rejected",
    )
    # Celery's one-line refusal of the pickled message is the feature here: it is logged
    # before the invalid_task count, which reaches Redis a quarter of a second later
    assert "pickle" in worker.output()
    mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/after-garbage", b"{}")
    mesh.settle()
    assert worker.alive()
    assert mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/after-garbage") is not None


def test_megabytes_of_values_are_listed_and_watched_in_parts(
    own_mesh: Callable[..., FaultMesh],
) -> None:
    """80 values of 900 KB under one prefix (72 MB, over gRPC's 64 MiB receive cap in one
    answer) sync through the watch, which etcd sends in fragments, and through a listing,
    whose pages shrink to fit: no request fails for ever."""
    mesh = own_mesh()
    a = mesh.client(0)
    big = {
        f"cilium/state/services/v1/cluster-a/big/svc-{i}".encode(): bytes([65 + i % 26]) * 900_000
        for i in range(80)
    }
    for key, value in big.items():
        a.put(key, value)
    mesh.settle(wait=300)
    # a watcher that must list the source meets them all in one range
    from pipeline.protocol.names import gen_key

    mesh.watch.kill()
    mesh.client(1).delete(gen_key("cluster-a"))
    w2 = mesh.start_watcher()
    eventually(
        lambda: (
            w2.metric(
                "kvmesh_watcher_resyncs_total", source_cluster="cluster-a", reason="no_generation"
            )
            == 1
        ),
        timeout=120,
        what="the listing done",
    )
    assert w2.metric("kvmesh_watcher_source_failures_total", source_cluster="cluster-a") == 0
    mesh.wait_equal(300)


def test_messages_that_trip_celerys_consumer_stop_no_worker(mesh: FaultMesh) -> None:
    """Messages whoever can write to Redis may send, shaped to make Celery's own receiving
    code fail (no task ID, of a known task or an unknown one; a body that is a bare number,
    or a mapping with headers of its own; time limits that are not two numbers; stamps that
    are not a list; an eta out of the clock's range; more of some than the pool has slots):
    each is refused, counted and dropped, and the same Celery worker goes on syncing."""
    before = mesh.stats("-", "-")
    worker = mesh.base_worker
    assert worker is not None
    celery_before = worker.children_pids()
    assert celery_before
    queue = Queue(
        "kvmesh.cluster-a",
        Exchange("kvmesh.cluster-a", type="direct"),
        routing_key="kvmesh.cluster-a",
    )
    known = {"lang": "py", "task": "kvmesh.apply_batch"}
    shapes: list[tuple[dict[str, Any], Any]] = [
        ({"lang": "py", "task": "no.such.task"}, [[], {}, {}]),
        ({"lang": "py", "task": "no.such.task"}, {}),
        (known, [[], {}, {}]),
        (dict(known, id="bad-4"), 5),
        (dict(known, id="bad-5", timelimit=["a", None]), [[], {}, {}]),
        # an eta Celery parses and cannot convert to its clock: it logged a traceback
        (dict(known, id="bad-6", eta="0001-01-01T00:00:00+14:00"), [[], {}, {}]),
    ]
    for i in range(3):  # more of each than the pool has slots
        shapes += [
            (dict(known, id=f"bad-limit-{i}", timelimit=5), [[], {}, {}]),
            (dict(known, id=f"bad-body-{i}"), {"args": [], "kwargs": {}, "timelimit": 5}),
            (dict(known, id=f"bad-stamps-{i}", stamped_headers=5), [[], {}, {}]),
        ]
    with Connection(mesh.redis.url) as conn:
        producer = Producer(conn)
        for headers, body in shapes:
            producer.publish(
                body,
                serializer="json",
                headers=headers,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
            )
    eventually(
        lambda: (
            mesh.stats("-", "-").get("unreceivable", 0)
            >= before.get("unreceivable", 0) + len(shapes)
        ),
        timeout=60,
        what="every such message counted as unreceivable",
    )
    mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/after-tripwires", b"{}")
    mesh.settle()
    assert mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/after-tripwires") is not None
    assert worker.children_pids() == celery_before  # no Celery worker stopped and restarted
