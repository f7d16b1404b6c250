"""The trust boundary, tried as an attacker or an unlucky operator would: whoever can write
to Redis or log into Flower cannot write through the pipeline, cannot steer it, and a
source's hostile data never stops its sync."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from pipeline.clients.celeryapp import create_app
from pipeline.protocol.names import fence_key, gen_key, leader_key, resync_key
from pipeline.tools.cilium_state import (
    cluster_config_value,
    identity_id,
    identity_labels,
    write_items,
)
from pipeline.tools.servers import free_port

from ..harness import eventually
from .conftest import FaultMesh

pytestmark = pytest.mark.faults

A, B = "cluster-a", "cluster-b"
RESYNCS = "kvmesh_watcher_resyncs_total"
FORGED = {
    b"cilium/state/nodes/v1/cluster-b/injected": b'{"Name":"evil"}',  # the target's own state
    b"cilium/cluster-config/cluster-b": b'{"id":2,"evil":true}',  # the target's config
    b"kvmesh/cluster-a/gen": b'{"gen":1}',  # kvmesh's own records
}


def untouched(mesh: FaultMesh) -> bool:
    b = mesh.client(1)
    return (
        all((kv := b.get(k)) is None or kv.value != v for k, v in FORGED.items())
        and b.get(b"cilium/state/nodes/v1/cluster-b/injected") is None
    )


def forge(payload: dict[str, object]) -> dict[str, object]:
    """A copy of a genuine payload with forged operations added to its first batch."""
    forged = json.loads(json.dumps(payload))
    batch = forged["batches"][0]  # type: ignore[index]
    for key, value in FORGED.items():
        batch["ops"].append(  # type: ignore[index]
            ["p", base64.b64encode(key).decode(), base64.b64encode(value).decode()]
        )
    return forged


def forge_payload(r: Any, key: bytes | str) -> None:
    """Rewrite a payload published by reference in place, forged (its expiry kept), in the
    watcher's own spelling with the signature still last: the worker checks such a text's
    bytes as they are (Signer.verify_text) before it parses them."""
    forged = json.dumps(forge(json.loads(r.get(key))), separators=(",", ":"))
    assert forged.endswith("}}") and ',"sig":{"kid":' in forged[-120:]
    r.set(key, forged, keepttl=True)


def restart_worker_until(mesh: FaultMesh, reason: str, what: str) -> None:
    """Start the baseline worker again and wait until it has dropped a task for *reason*."""
    before = mesh.stats("-", "-").get(reason, 0)
    mesh.start_worker()
    eventually(lambda: mesh.stats("-", "-").get(reason, 0) > before, timeout=60, what=what)


def test_a_task_rewritten_in_the_queue_is_refused(mesh: FaultMesh) -> None:
    """A genuine task changed in place in Redis (LSET), keeping its generation and positions
    but carrying puts into the target's own state, its config and kvmesh's records, is
    refused for its signature; nothing of it lands and the mesh stays exact."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    mesh.backlog(tasks=1, sources=[A])
    r = mesh.redis_client()
    raw = r.lindex("kvmesh.cluster-a", -1)  # the next one a worker takes
    message = json.loads(raw)
    # a watcher's task (JSON text), or a retry the churning worker published through Celery
    # (base64) before it stopped: either is signed, and either must be refused once forged
    encoding = message["properties"]["body_encoding"]
    assert encoding in ("utf-8", "base64")
    text = message["body"] if encoding == "utf-8" else base64.b64decode(message["body"])
    body = json.loads(text)
    if "ref" in body[0][0]:  # a large task: its payload waits in Redis, rewrite it there
        forge_payload(r, body[0][0]["ref"])
    else:
        body[0][0] = forge(body[0][0])
        text = json.dumps(body)
        message["body"] = text if encoding == "utf-8" else base64.b64encode(text.encode()).decode()
        r.lset("kvmesh.cluster-a", -1, json.dumps(message))
    restart_worker_until(mesh, "bad_signature", "the rewritten task refused")
    mesh.settle()
    assert untouched(mesh)


def payloads_by_reference(mesh: FaultMesh) -> list[bytes]:
    """With no worker consuming, make the watcher of A publish tasks too large to travel
    inline (300 new identities whose values are over a kilobyte each: a task of a dozen of
    them is over CLAIM_CHECK_BYTES, however a flush is cut into tasks), and return the
    Redis keys of the payloads published by reference."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    r = mesh.redis_client()
    # one an earlier test's killed worker still holds (unacknowledged) may be there: only
    # those published now count
    before = set(r.scan_iter("kvmesh:payload:*"))
    base = 50_000  # above the simulator's identities, inside the cluster's 16 bits
    write_items(
        mesh.client(0),
        (
            (
                f"cilium/state/identities/v1/id/{identity_id(1, base + i)}".encode(),
                (identity_labels(A, base + i) + "k8s:pad=" + "x" * 1024 + ";").encode(),
            )
            for i in range(300)
        ),
        per_txn=100,
    )
    return eventually(
        lambda: [k for k in r.scan_iter("kvmesh:payload:*") if k not in before],
        timeout=60,
        what="a task published by reference",
    )


def test_a_payload_rewritten_in_redis_is_refused(mesh: FaultMesh) -> None:
    """A task's payload that travels by reference (a claim check) is as signed as one inside
    the message: rewritten in place in Redis with forged operations, it is refused for its
    signature, and nothing of it lands."""
    r = mesh.redis_client()
    forged = payloads_by_reference(mesh)
    for key in forged:
        forge_payload(r, key)
    restart_worker_until(mesh, "bad_signature", "the rewritten payload refused")
    mesh.settle()
    assert untouched(mesh)
    assert not any(r.exists(k) for k in forged)  # a refused task's payload is dropped


def test_healthy_tasks_delete_their_payloads(mesh: FaultMesh) -> None:
    """The payloads of tasks that landed are deleted once their tasks are done (with the
    outcome counters, a moment later), and the mesh is exact."""
    r = mesh.redis_client()
    published = payloads_by_reference(mesh)
    mesh.start_worker()
    eventually(
        lambda: not any(r.exists(k) for k in published),
        timeout=60,
        what="the payloads of the tasks that landed deleted",
    )
    mesh.settle()


def test_a_task_whose_payload_is_gone_is_counted_and_the_sync_recovers(
    mesh: FaultMesh,
) -> None:
    """A task published by reference whose payload was deleted (or expired) before a worker
    took it is counted (payload_gone) and dropped; the batches it carried are missing, and
    the mesh becomes exact again the way it does after any lost task."""
    r = mesh.redis_client()
    for key in payloads_by_reference(mesh):
        r.delete(key)
    restart_worker_until(mesh, "payload_gone", "the task without its payload counted")
    mesh.settle(240)


def test_tasks_sent_through_flower_or_straight_to_redis_are_refused(mesh: FaultMesh) -> None:
    """Flower's task API (send-task: Flower holds no task and no key) and a raw publish
    reach the workers, and the workers drop what is not signed by the mesh's key (unsigned,
    or signed with another key)."""
    port = free_port()
    auth = "ops:" + "f" * 20
    flower = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "flower", "--port", str(port)],
        env=dict(mesh.env, FLOWER_BASIC_AUTH=auth),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        payload = {"v": 2, "batches": [], "sig": {"kid": "0" * 16, "hmac": "0" * 64}}
        sample = forge(
            {
                "v": 2,
                "batches": [
                    {
                        "source": A,
                        "target": B,
                        "shard": "nodes-0",
                        "gen": 1 << 60,
                        "prev": [1, 0],
                        "pos": [2, 0],
                        "done": True,
                        "ops": [],
                    }
                ],
            }
        )
        before = mesh.stats("-", "-")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/task/send-task/kvmesh.apply_batch",
            data=json.dumps({"args": [sample]}).encode(),
            headers={
                "Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
                "Content-Type": "application/json",
            },
            method="POST",
        )

        def posted() -> bool:
            try:
                with urllib.request.urlopen(request, timeout=3) as resp:
                    return resp.status == 200
            except OSError:
                return False

        eventually(posted, timeout=60, what="Flower accepting the forged task")
        payload["batches"] = sample["batches"]
        create_app(mesh.settings).send_task(
            "kvmesh.apply_batch",
            args=[payload],
            queue="kvmesh.cluster-a",
            task_id="forged\nline: a task ID that breaks the line",
        )
        eventually(
            lambda: (
                mesh.stats("-", "-").get("unsigned", 0) > before.get("unsigned", 0)
                and mesh.stats("-", "-").get("unknown_key", 0) > before.get("unknown_key", 0)
            ),
            timeout=60,
            what="both forged tasks refused",
        )
        # the worker's refusal names the task ID, escaped on its one line: this log line
        # is the feature (an ID from Redis may not forge lines in the worker's log)
        eventually(
            lambda: "forged\\x0aline: a task ID" in mesh.base_worker.output(),
            timeout=30,
            what="the forged task ID logged on one line, escaped",
        )
        assert "\nline: a task ID" not in mesh.base_worker.output()
        # and Celery's own lines are in kvmesh's format, so they are escaped too
        assert re.search(
            r"^\S+ \S+ INFO MainProcess celery\.apps\.worker: \S+ ready\.$",
            mesh.base_worker.output(),
            re.MULTILINE,
        )
    finally:
        flower.terminate()
        flower.wait(20)
    mesh.settle()
    assert untouched(mesh)


def test_a_signed_task_outside_the_layout_is_refused(mesh: FaultMesh) -> None:
    """The layout holds whatever the signature says: a task signed with the mesh's own key
    that writes beyond its source's cache is refused whole and counted for its pair."""
    from pipeline.protocol.wire import Signer

    signer = Signer(mesh.settings.signing)
    gen = mesh.gen(A, B)
    assert gen is not None
    task = signer.sign(
        forge(
            {
                "v": 2,
                "batches": [
                    {
                        "source": A,
                        "target": B,
                        "shard": "nodes-0",
                        "gen": gen,
                        "prev": [1, 0],
                        "pos": [2, 0],
                        "done": True,
                        "ops": [],
                    }
                ],
            }
        )
    )
    before = mesh.stats(A, B).get("forbidden", 0)
    create_app(mesh.settings).send_task("kvmesh.apply_batch", args=[task], queue="kvmesh.cluster-a")
    eventually(
        lambda: mesh.stats(A, B).get("forbidden", 0) > before,
        timeout=60,
        what="the signed task refused for its keys",
    )
    mesh.settle()
    assert untouched(mesh)


def test_a_lease_key_written_by_hand_neither_stops_nor_blocks_the_watcher(mesh: FaultMesh) -> None:
    """`SET kvmesh:leader:<source> x` does not make the active watcher step down: nobody
    renews that value, so it gets a TTL, expires, and the watcher holds the lease again,
    active throughout, in the same generation."""
    r = mesh.redis_client()
    before = mesh.gen(A, B)
    r.set("kvmesh:leader:cluster-a", "x")
    eventually(
        lambda: r.get("kvmesh:leader:cluster-a") not in (None, b"x"),
        timeout=60,
        what="the lease back with the watcher",
    )
    assert mesh.watch.gauge("kvmesh_watcher_active", source_cluster=A) == 1
    assert mesh.gen(A, B) == before
    mesh.settle()


def test_a_leader_key_of_any_bytes_stops_no_watcher(mesh: FaultMesh) -> None:
    """Anyone who can write to Redis can write a source's leader key. A value that is not
    UTF-8 text (nor printable) held by nobody is shown escaped to a standby, which waits for
    it to expire like any other value and then takes over."""
    mesh.watch.kill()
    # written over the dead watcher's lease without a TTL: the standby's first look gives it
    # one (sync.leader_ttl), so it is still there when the standby first reads it
    mesh.redis_client().set(leader_key(A), b"\xff\x1b[2J\nforged line")
    standby = mesh.watcher("watch2")
    mesh.base_watcher = standby
    eventually(
        lambda: all(standby.gauge("kvmesh_watcher_active", source_cluster=n) == 1 for n in (A, B)),
        timeout=60,
        what="the standby active for both sources",
    )
    assert standby.alive()
    # the value was shown as it is, escaped (the escaping is the feature)
    out = standby.output()
    assert "standby; \\xff\\x1b[2J\\x0aforged line is active" in out, out
    assert "\x1b" not in out
    mesh.settle()


def test_remote_control_cannot_stop_the_worker(mesh: FaultMesh) -> None:
    """Anyone who can write to Redis can send Celery's remote-control commands; a kvmesh
    worker answers only those that read its state, so `shutdown`, `rate_limit` and `hello`
    (with a list of task IDs to revoke) change nothing. And a Celery worker that dies all
    the same is started again by `kvmesh worker`: the mesh keeps syncing either way."""
    worker = mesh.base_worker
    assert worker is not None
    app = create_app(mesh.settings)

    def stats() -> dict[str, object] | None:
        reply = app.control.inspect(destination=[worker.node], timeout=2).stats() or {}
        return reply.get(worker.node)

    before = eventually(stats, timeout=60, what="the worker answering")
    app.control.shutdown(destination=[worker.node])
    app.control.rate_limit("kvmesh.apply_batch", "1/h", destination=[worker.node])
    # `hello` would merge a list of task IDs into the worker's revoked ones (dropped unread)
    victim = "c0ffee00-0000-4000-8000-000000000000"
    app.control.broadcast(
        "hello",
        arguments={"from_node": "intruder@nowhere", "revoked": [victim]},
        destination=[worker.node],
    )
    put_and_wait(mesh, b"after-shutdown")

    # control messages are handled in the order they came: the hello before this
    def revoked() -> tuple[list[str]] | None:
        reply = app.control.inspect(destination=[worker.node], timeout=2).revoked() or {}
        return (reply[worker.node],) if worker.node in reply else None  # [] is an answer

    (ids,) = eventually(revoked, timeout=60, what="the worker's revoked IDs")
    assert victim not in ids, ids
    after = eventually(stats, timeout=60, what="the worker answering")
    assert after["pid"] == before["pid"], "the worker obeyed a remote shutdown"
    os.kill(int(after["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    put_and_wait(mesh, b"after-kill")
    assert eventually(stats, timeout=60, what="a new Celery worker")["pid"] != after["pid"]
    assert worker.alive()
    mesh.settle()


def put_and_wait(mesh: FaultMesh, name: bytes) -> None:
    """Write a node into cluster-a and wait until cluster-b caches it."""
    mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/" + name, b"{}")
    eventually(
        lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/" + name),
        timeout=90,
        what=f"node {name!r} cached",
    )


def test_corrupt_kvmesh_records_mean_a_resync_never_a_crash(mesh: FaultMesh) -> None:
    """Garbage in a fence or the generation record is taken as "no record": the pair is
    resynced, the watcher and workers live on, and the caches end exact."""
    b = mesh.client(1)
    for key in (fence_key(A, "nodes-0"), gen_key(A)):
        resyncs = mesh.watch.metric(RESYNCS, source_cluster=A, reason="corrupt_record")
        b.put(key, b"[" * 3000 + b"\xff")
        eventually(
            lambda resyncs=resyncs: (
                mesh.watch.metric(RESYNCS, source_cluster=A, reason="corrupt_record") > resyncs
            ),
            timeout=60,
            what=f"a resync for the corrupt {key!r}",
        )
    mesh.settle()
    assert mesh.watch.alive()


def test_a_resync_request_for_a_generation_nobody_opened_is_ignored(mesh: FaultMesh) -> None:
    """Only a worker of the current generation can make the watcher resync; a request for a
    higher generation, or one that does not decode, is ignored and counted."""
    gen = mesh.gen(A, B)
    assert gen is not None
    b = mesh.client(1)
    for forged in (json.dumps({"gen": gen + 10**9}).encode(), b"\xff not json"):
        ignored = mesh.watch.metric(
            "kvmesh_watcher_resync_requests_total", source_cluster=A, outcome="ignored"
        )
        b.put(resync_key(A), forged)
        eventually(
            lambda ignored=ignored: (
                mesh.watch.metric(
                    "kvmesh_watcher_resync_requests_total", source_cluster=A, outcome="ignored"
                )
                > ignored
            ),
            timeout=60,
            what="the forged request ignored",
        )
    assert mesh.gen(A, B) == gen
    mesh.settle()


def test_hostile_source_values_never_stop_the_sync(mesh: FaultMesh) -> None:
    """A cluster config nested 30,000 deep, one with a 5,000-digit number, one of another
    cluster ID, a non-canonical identity ID and a key with a newline: each is reported on
    one line with its key escaped, counted, and everything else keeps syncing, also after
    the watcher restarts and meets them again."""
    a = mesh.client(0)
    config = b"cilium/cluster-config/cluster-a"
    good = a.get(config)
    assert good is not None
    rejected = mesh.watch.metric("kvmesh_watcher_rejected_total", source_cluster=A)
    hostile = [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"id": 1, "n": ' + b"9" * 5000 + b"}",
        cluster_config_value(7),
    ]
    bad_id = f"cilium/state/identities/v1/id/000{identity_id(1, 9)}".encode()
    bad_line = b"cilium/state/identities/v1/id/1\nforged: line"
    try:
        for value in hostile:
            a.put(config, value)
        a.put(bad_id, b"k8s:x=y;")
        a.put(bad_line, b"k8s:x=y;")
        eventually(
            lambda: (
                mesh.watch.metric("kvmesh_watcher_rejected_total", source_cluster=A) >= rejected + 5
            ),
            timeout=60,
            what="the hostile keys counted",
        )
        # the escaped key on one line is the feature here (counted first, then logged)
        eventually(
            lambda: "id/1\\x0aforged: line" in mesh.watch.output(),
            timeout=30,
            what="the key with a newline logged on one line, escaped",
        )
        put_node = b"cilium/state/nodes/v1/cluster-a/still-syncing"
        a.put(put_node, b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/still-syncing"),
            timeout=60,
            what="the rest still syncing",
        )
        # a restarted watcher that has to list the source meets every one of them again
        mesh.watch.kill()
        mesh.client(1).delete(gen_key(A))
        w2 = mesh.start_watcher()
        eventually(
            lambda: w2.metric(RESYNCS, source_cluster=A, reason="no_generation") == 1,
            timeout=60,
            what="the restarted watcher listing the source",
        )
        a.put(b"cilium/state/nodes/v1/cluster-a/after-restart", b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/after-restart"),
            timeout=60,
            what="the restarted watcher syncing",
        )
        assert w2.alive()
    finally:
        a.put(config, good.value)
        a.delete(bad_id)
        a.delete(bad_line)
    mesh.settle()


def test_a_full_broker_pauses_publishing_without_a_resync_loop(mesh: FaultMesh) -> None:
    """When Redis refuses writes (out of memory), and when the queue holds
    sync.max_queue_depth tasks, the watcher pauses publishing and keeps the changes; no
    resync is started for it; everything lands once there is room again."""
    assert mesh.base_worker is not None
    mesh.base_worker.stop()
    mesh.watch.stop()
    w = mesh.watcher("oom-watch")
    eventually(
        lambda: w.gauge("kvmesh_watcher_active", source_cluster=A) == 1,
        timeout=60,
        what="the watcher active (taking its lease needs a write)",
    )
    r = mesh.redis_client()
    r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) + 16 * 1024))
    try:
        eventually(
            lambda: (
                w.metric(
                    "kvmesh_watcher_publish_paused_total", source_cluster=A, reason="broker_error"
                )
                > 0
            ),
            timeout=60,
            what="publishing paused on an out-of-memory reply",
        )
        held = mesh.queue_depth(A)  # no worker takes, and Redis refuses pushes: it stays
    finally:
        r.config_set("maxmemory", "0")
    eventually(lambda: mesh.queue_depth(A) > held, timeout=60, what="publishing again")
    assert w.metric(RESYNCS) == 0, "a full broker started a resync"
    w.stop()
    w2 = mesh.watcher("depth-watch", env={"KVMESH_SYNC_MAX_QUEUE_DEPTH": "3"})
    eventually(
        lambda: (
            w2.metric("kvmesh_watcher_publish_paused_total", source_cluster=A, reason="queue_full")
            > 0
        ),
        timeout=60,
        what="publishing paused at the queue limit",
    )
    mesh.worker("bp-worker")
    mesh.settle()
    assert w2.metric(RESYNCS) == 0, "a full queue started a resync"
