"""The watcher's publisher writes Celery's task message by hand (pipeline.clients.publisher).
Against a real Redis, its message must be the one Celery's own `send_task` writes for the same
task, but for the ids, the origin and the body's encoding, and kombu's Redis transport must
take it, hand it back to the queue on a reject (what a worker lost mid-task does) and take it
again with the same body. Every end-to-end test has a Celery worker consume these messages."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.connection import AbstractConnection

from pipeline.clients.broker import Broker, redis_at
from pipeline.clients.celeryapp import create_app, keep_redis_clients
from pipeline.clients.publisher import BUSY_FOR, RedisPublisher
from pipeline.config import load_settings
from pipeline.protocol.errors import QueueFullError, RetryableError
from pipeline.protocol.layout import Op
from pipeline.protocol.names import (
    CLAIM_CHECK_BYTES,
    PAYLOAD_TTL_SECONDS,
    TASK_NAME,
    UNACKED_INDEX,
    is_payload_key,
    payload_key,
    stats_key,
)
from pipeline.protocol.wire import Batch, Operation, Signer, SigningKeys, encode_task
from pipeline.tools.meshconfig import mesh_config

from ..harness import Servers

pytestmark = pytest.mark.integration

QUEUE = "kvmesh.cluster-a"


def batch() -> Batch:
    # a key and a value that are not UTF-8 travel as base64 inside the JSON body
    ops = (Operation(Op.PUT, b"cilium/cache/nodes/v1/cluster-a/n\xff", b'{"x":"\xfe"}'),)
    return Batch("cluster-a", "cluster-b", "nodes-0", 7, (1, 0), (2, 1), ops)


def popped_raw(client: Any) -> bytes:
    raw = client.rpop(QUEUE)
    assert raw is not None, "nothing was queued"
    assert client.llen(QUEUE) == 0
    assert isinstance(raw, bytes)
    return raw


def popped(client: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(popped_raw(client))
    return message


def test_the_hand_written_message_is_celerys_own(servers: Servers, tmp_path: Path) -> None:
    redis = servers.redis()
    config = tmp_path / "mesh.toml"
    config.write_text(
        mesh_config(
            broker_url=redis.url,
            signing_key_file=None,
            clusters=[
                {"name": "cluster-a", "id": 1, "endpoints": ["http://127.0.0.1:1"]},
                {"name": "cluster-b", "id": 2, "endpoints": ["http://127.0.0.1:2"]},
            ],
        )
    )
    settings = load_settings(str(config), env={})
    client = redis_at(redis.url)
    signer = Signer(SigningKeys((b"k" * 32,)))
    sizes: list[tuple[int, int]] = []

    RedisPublisher(QUEUE, client, signer, on_task=lambda *n: sizes.append(n)).publish([batch()])
    raw = popped_raw(client)
    ours = json.loads(raw)
    payload = encode_task([batch()], signer)
    # the payload's size, and every byte written to Redis: the message, payload included
    assert sizes == [(len(json.dumps(payload, separators=(",", ":"))), len(raw))]

    app = create_app(settings)
    app.send_task(
        TASK_NAME,
        args=[payload],
        argsrepr="[cluster-a->cluster-b 1 batches 1 ops]",
        kwargsrepr="{}",
        queue=QUEUE,
        routing_key=QUEUE,
    )
    theirs = popped(client)

    # the body: Celery's is base64 of JSON, ours the JSON itself; both say which
    assert theirs["properties"]["body_encoding"] == "base64"
    assert ours["properties"]["body_encoding"] == "utf-8"
    assert json.loads(ours["body"]) == json.loads(base64.b64decode(theirs["body"]))
    assert json.loads(ours["body"])[0] == [payload]
    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")
    }

    # the same headers and properties, with the same values but for the ids and the origin
    # (and reply_to: Celery names its app there for results, and kvmesh's tasks have none)
    ids = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "body_encoding"}
    ids.add("reply_to")

    def fixed(d: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
        # as JSON text, so that types count too (False is not 0, None is not "")
        return json.dumps({k: v for k, v in d.items() if k not in ids | set(drop)}, sort_keys=True)

    assert fixed(ours["headers"]) == fixed(theirs["headers"])
    # Celery copies send_task's argsrepr and kwargsrepr into the properties as well; no
    # worker reads them there (the worker's request takes them from the headers)
    assert fixed(ours["properties"]) == fixed(theirs["properties"], ("argsrepr", "kwargsrepr"))
    assert ours["properties"]["reply_to"] == ""
    assert ours["headers"]["origin"].startswith("gen")
    for m in (ours, theirs):
        assert m["headers"]["root_id"] == m["headers"]["id"] == m["properties"]["correlation_id"]
        assert m["properties"]["delivery_tag"] != m["headers"]["id"]
    assert ours["headers"]["id"] != theirs["headers"]["id"]
    client.close()


def worker_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the worker's transport (keep_redis_clients) in this test only."""
    from kombu.transport import TRANSPORT_ALIASES, _transport_cache, get_transport_cls

    for scheme in ("redis", "rediss"):
        monkeypatch.setitem(TRANSPORT_ALIASES, scheme, TRANSPORT_ALIASES[scheme])
        monkeypatch.setitem(_transport_cache, scheme, get_transport_cls(scheme))
    keep_redis_clients()


@pytest.mark.parametrize("transport", ["kombu", "worker"])
def test_kombu_takes_the_message_requeues_it_and_takes_it_again(
    servers: Servers, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Celery worker's consumer does with a message, through kombu's Redis transport
    with acknowledgements (kombu's own, and the worker's, which keeps its Redis client): the
    body decodes to the task's arguments, a reject with requeue (a worker lost mid-task,
    task_reject_on_worker_lost) puts the stored message back, where the watcher's look at
    its queue counts it, and it comes again unchanged and marked redelivered."""
    from kombu import Connection

    if transport == "worker":
        worker_transport(monkeypatch)
    redis = servers.redis()
    with Connection(redis.url) as conn:
        channel = type(conn.default_channel).__name__
    assert channel == ("_Channel" if transport == "worker" else "Channel")
    client = redis_at(redis.url)
    signer = Signer(SigningKeys((b"k" * 32,)))
    publisher = RedisPublisher(QUEUE, client, signer)
    publisher.publish([batch()])
    assert publisher.backlog() == 1
    payload = encode_task([batch()], signer)
    with Connection(redis.url) as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=False)
        first = queue.get(timeout=10)
        assert first.headers["task"] == TASK_NAME
        assert first.payload[0] == [payload]
        assert publisher.backlog() == 0
        first.reject(requeue=True)
        assert publisher.backlog() == 1
        again = queue.get(timeout=10)
        assert again.payload == first.payload
        assert again.headers["id"] == first.headers["id"]
        assert again.delivery_info["redelivered"] is True
        again.ack()
        queue.close()
    assert client.llen(QUEUE) == 0
    assert client.hlen("unacked") == 0
    client.close()


def test_the_worker_transport_keeps_one_client_while_its_pool_lasts(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's channel makes its Redis client once, and again once kombu replaced the
    connection pool under it (after a fork, or a reconnect): never one tied to a pool that
    was let go."""
    from kombu import Connection

    worker_transport(monkeypatch)
    redis = servers.redis()
    with Connection(redis.url) as conn:
        channel = conn.default_channel
        assert type(channel).__name__ == "_Channel"
        kept = channel._create_client()
        assert channel._create_client() is kept
        with channel.conn_or_acquire() as client:  # what kombu's bookkeeping goes through
            assert client is kept
        assert kept.connection_pool is channel.pool
        channel._disconnect_pools()  # what kombu does after a fork, or to reconnect
        fresh = channel._create_client()
        assert fresh is not kept
        assert fresh.connection_pool is channel.pool
        assert fresh.ping()


def test_kvmeshs_redis_clients_send_no_library_info(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kvmesh's own Redis clients connect without CLIENT SETINFO (see broker._QUIET), where
    redis-py's defaults send it: what each connection sends, whatever the server's version."""
    url = servers.redis().url
    sent: list[tuple[Any, ...]] = []
    original = AbstractConnection.send_command

    def recording(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        sent.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_command", recording)

    def setinfo(client: Redis) -> bool:
        sent.clear()
        assert client.ping()
        assert sent[-1] == ("PING",), sent
        return any(tuple(map(str, a[:2])) == ("CLIENT", "SETINFO") for a in sent)

    assert setinfo(Redis.from_url(url))  # what the check below would miss
    assert not setinfo(redis_at(url))


def test_a_large_payload_travels_by_reference(servers: Servers) -> None:
    """A task over CLAIM_CHECK_BYTES is published as a message naming its payload, which
    waits in a Redis string of its own with an expiry; a small one stays in the message."""
    redis = servers.redis()
    client = redis_at(redis.url)
    signer = Signer(SigningKeys((b"k" * 32,)))
    ops = tuple(
        Operation(Op.PUT, f"cilium/cache/nodes/v1/cluster-a/n{i}".encode(), b"v" * 100)
        for i in range(127)
    )
    big = Batch("cluster-a", "cluster-b", "nodes-0", 7, (1, 0), (2, 1), ops)
    sizes: list[tuple[int, int]] = []
    publisher = RedisPublisher(QUEUE, client, signer, on_task=lambda *n: sizes.append(n))
    publisher.publish([big])
    raw = popped_raw(client)
    (claim,) = json.loads(json.loads(raw)["body"])[0]
    assert list(claim) == ["ref"] and is_payload_key(claim["ref"])
    text = client.get(claim["ref"])
    assert text is not None and len(text) == sizes[0][0] > CLAIM_CHECK_BYTES
    # written: the message that names the payload, and the payload stored beside it
    assert sizes[0][1] == len(raw) + len(text)
    assert json.loads(text) == encode_task([big], signer)
    assert 0 < client.ttl(claim["ref"]) <= PAYLOAD_TTL_SECONDS
    client.delete(claim["ref"])

    publisher.publish([batch()])
    assert json.loads(popped(client)["body"])[0] == [encode_task([batch()], signer)]
    assert not list(client.scan_iter("kvmesh:payload:*"))
    client.close()


def test_payloads_are_deleted_with_the_counters(servers: Servers) -> None:
    """Broker.add_stats adds each pair's counters and deletes every payload named, in one
    round trip; a counter Redis refuses is raised, and the deletes go through all the
    same."""
    client = redis_at(servers.redis().url)
    broker = Broker(client)
    names = [payload_key(f"{i:032x}") for i in range(3)]
    for name in names:
        client.set(name, b"payload")
    broker.add_stats([("cluster-a", "cluster-b", {"applied": 2, "grouped": 0})], names[:2])
    assert [client.exists(n) for n in names] == [0, 0, 1]
    assert client.hgetall(stats_key("cluster-a", "cluster-b")) == {b"applied": b"2"}
    broker.add_stats([("cluster-a", "cluster-b", {"applied": 1})])
    assert client.exists(names[2]) == 1
    client.set(stats_key("cluster-c", "cluster-b"), b"not a hash")  # HINCRBY refused
    with pytest.raises(RetryableError):
        broker.add_stats([("cluster-c", "cluster-b", {"applied": 1})], names[2:])
    assert client.exists(names[2]) == 0
    assert client.hgetall(stats_key("cluster-a", "cluster-b")) == {b"applied": b"3"}
    # what Broker.stats gives `kvmesh status` to print: outcome names only
    forged = {b"\x1b]0;x\x07\nfake row": 1, b"Applied": 1, b"gap_wait": b"x", b"\xff": 1}
    client.hset(stats_key("cluster-a", "cluster-b"), mapping=forged)
    assert broker.stats("cluster-a", "cluster-b") == {"applied": 3}
    client.close()


def test_a_flush_is_cut_into_tasks_of_one_transaction_each(servers: Servers) -> None:
    """txn_ops reaches the grouping: 16 shards' batches of 25 operations for one target are
    four messages of one transaction's worth each (25 + 1 fence, four shards), and one
    message without it."""
    client = redis_at(servers.redis().url)
    client.delete(QUEUE)

    def shard(s: int) -> Batch:
        ops = tuple(
            Operation(Op.PUT, b"cilium/cache/nodes/v1/cluster-a/n%d-%d" % (s, i), b"{}")
            for i in range(25)
        )
        return Batch("cluster-a", "cluster-b", f"nodes-{s}", 7, (1, 0), (2, s), ops)

    flush = [shard(s) for s in range(16)]
    RedisPublisher(QUEUE, client, None).publish(flush, 64, txn_ops=128)
    assert client.llen(QUEUE) == 4
    client.delete(QUEUE)
    RedisPublisher(QUEUE, client, None).publish(flush, 64)
    assert client.llen(QUEUE) == 1
    client.delete(QUEUE)


def test_the_bytes_in_the_queue_are_those_of_the_newest_tasks(servers: Servers) -> None:
    """queued_bytes counts what was written for each task (the message, and a payload
    stored by reference) until the queue's length, at the next look, says a worker took
    it: kombu's consumers take the oldest first, so what the queue holds is the newest."""
    redis = servers.redis()
    client = redis_at(redis.url)
    written: list[int] = []
    publisher = RedisPublisher(
        QUEUE,
        client,
        Signer(SigningKeys((b"k" * 32,))),
        on_task=lambda _payload, size: written.append(size),
    )
    big = Operation(Op.PUT, b"cilium/cache/nodes/v1/cluster-a/big", b"v" * CLAIM_CHECK_BYTES)
    large = dataclasses.replace(batch(), ops=(big,))
    for b in (batch(), large, batch()):
        publisher.publish([b])
    assert len(written) == 3 and written[1] > CLAIM_CHECK_BYTES  # its payload counts too
    assert publisher.queued_bytes() == sum(written)  # no look since: as published
    assert publisher.backlog() == 3
    assert publisher.queued_bytes() == sum(written)
    client.rpop(QUEUE)  # a worker takes the oldest
    assert publisher.backlog() == 2
    assert publisher.queued_bytes() == written[1] + written[2]
    client.rpop(QUEUE)
    client.rpop(QUEUE)
    assert publisher.backlog() == 0
    assert publisher.queued_bytes() == 0
    for key in client.scan_iter(match="kvmesh:payload:*"):
        client.delete(key)  # the large task's, which no worker took
    client.close()


def test_a_budget_stops_a_publish_before_the_next_task(servers: Servers) -> None:
    """With a byte budget, the first task always goes, and the publish stops before the
    next once the tasks sent have used it: QueueFullError says how many batches went."""
    redis = servers.redis()
    client = redis_at(redis.url)
    client.delete(QUEUE)
    publisher = RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,))))
    batches = [dataclasses.replace(batch(), shard=f"nodes-{i}") for i in range(3)]
    with pytest.raises(QueueFullError) as err:
        publisher.publish(batches, per_task=1, budget=1)
    assert err.value.published == 1
    assert publisher.backlog() == 1
    publisher.publish(batches[1:], per_task=1, budget=1 << 30)
    assert publisher.backlog() == 3
    client.delete(QUEUE)
    client.close()


def refused(url: str, user: str, command: str) -> tuple[Any, Any]:
    """An admin client of the Redis at *url* (the queue emptied), and a client of a new ACL
    user *user* allowed every command but *command*."""
    admin = redis_at(url)
    admin.delete(QUEUE)
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", f"-{command}")
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return admin, redis_at(f"redis://{user}:pw@{host}:{port}/0")


def test_a_queue_whose_length_cannot_be_read_has_no_figure(servers: Servers) -> None:
    """A broker user refused LLEN: the publisher cannot tell what its queue holds, and says
    0 rather than a figure that would only grow (and hold a pause for good)."""
    redis = servers.redis()
    admin, client = refused(redis.url, "nollen", "llen")
    publisher = RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,))))
    publisher.publish([batch()])
    assert publisher.queued_bytes() > 0
    with pytest.raises(RetryableError):
        publisher.backlog()
    assert publisher.queued_bytes() == 0
    client.close()
    admin.execute_command("ACL", "DELUSER", "nollen")
    admin.delete(QUEUE)
    admin.close()


def test_the_shards_a_worker_holds_are_those_of_its_tracked_tasks(servers: Servers) -> None:
    """backlog(among) and busy_shards, through kombu's Redis transport with
    acknowledgements: a tracked task's shards are busy from when a consumer takes it until
    it acknowledges it, and a task published untracked (a resync's) never counts; only
    the shards asked about are answered for, and a look that asks about none sends only
    the LLEN. A task that a consumer holds for BUSY_FOR stops counting (a worker whose main
    process died mid-task leaves it in kombu's index until the visibility timeout)."""
    from kombu import Connection

    redis = servers.redis()
    client = redis_at(redis.url)
    client.delete(QUEUE)
    publisher = RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,))))
    now = [100.0]
    publisher.clock = lambda: now[0]
    shards = [dataclasses.replace(batch(), shard=f"nodes-{i}") for i in range(3)]
    every = {b.shard for b in shards}

    def busy(among: set[str] = every) -> set[str]:
        publisher.backlog(among)
        return publisher.busy_shards()

    publisher.publish(shards[:2], per_task=2, track=True)  # one task of two shards
    publisher.publish(shards[2:], track=False)
    assert publisher.backlog(every) == 2
    assert publisher.busy_shards() == set()  # queued, not taken
    with Connection(redis.url) as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=False)
        tracked = queue.get(timeout=10)
        assert busy() == {"nodes-0", "nodes-1"}
        assert busy({"nodes-1", "nodes-2"}) == {"nodes-1"}
        assert busy(set()) == set()
        untracked = queue.get(timeout=10)
        assert publisher.backlog(every) == 0
        assert publisher.busy_shards() == {"nodes-0", "nodes-1"}
        tracked.ack()
        assert busy() == set()
        untracked.ack()
        # held too long: no longer waited for
        publisher.publish(shards[:1], track=True)
        lost = queue.get(timeout=10)
        assert busy() == {"nodes-0"}
        now[0] += BUSY_FOR
        assert busy() == set()
        lost.ack()
        queue.close()
    client.close()


def test_a_redis_that_cannot_say_what_workers_hold_leaves_flushes_alone(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker user refused ZMSCORE (as an ACL may do, and as a Redis older than 6.2
    does): the publisher says once, in a line, that it cannot tell, still publishes and
    reads its queue's length, and from then on tracks nothing, so no flush waits."""
    from kombu import Connection

    redis = servers.redis()
    admin, client = refused(redis.url, "nozms", "zmscore")
    publisher = RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,))))
    with caplog.at_level(logging.WARNING, logger="kvmesh.watcher"), Connection(redis.url) as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=False)
        for _ in range(2):
            publisher.publish([batch()], track=True)
            taken = queue.get(timeout=10)
            assert publisher.backlog({batch().shard}) == 0
            assert publisher.busy_shards() == set()
            assert not publisher.tracks({batch().shard})  # tracking is off: nothing kept
            taken.ack()
        queue.close()
    lines = [r.getMessage() for r in caplog.records if "cannot tell" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{QUEUE}: cannot tell which of its tasks the workers hold")
    assert "\n" not in lines[0] and "pw" not in lines[0]
    client.close()
    admin.execute_command("ACL", "DELUSER", "nozms")
    admin.delete(QUEUE)
    admin.close()


def test_a_task_between_the_queue_and_kombus_index_is_not_forgotten(servers: Servers) -> None:
    """A worker's kombu pops a message, then notes it in its index of taken messages: a
    look between the two finds the task in neither list, and says it is not busy (one
    look missed), but keeps it, so that the next look, once the worker noted it, finds it
    busy. A task in neither list at two looks is done."""
    redis = servers.redis()
    client = redis_at(redis.url)
    client.delete(QUEUE, UNACKED_INDEX)
    publisher = RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,))))
    publisher.publish([batch()], track=True)
    shards = {batch().shard}
    tag = popped(client)["properties"]["delivery_tag"]  # popped: in neither list
    assert publisher.backlog(shards) == 0
    assert publisher.busy_shards() == set()
    client.zadd(UNACKED_INDEX, {tag: time.time()})  # what kombu's QoS.append does next
    assert publisher.backlog(shards) == 0
    assert publisher.busy_shards() == shards
    client.zrem(UNACKED_INDEX, tag)  # acknowledged
    assert publisher.backlog(shards) == 0
    assert publisher.busy_shards() == set()
    assert not publisher.tracks(shards)  # done, forgotten
    publisher.publish([batch()], track=True)
    popped(client)  # taken and done before any look saw it held
    for _ in range(2):
        assert publisher.tracks(shards)
        assert publisher.backlog(shards) == 0
        assert publisher.busy_shards() == set()
    assert not publisher.tracks(shards)  # in neither list at two looks: done
    client.close()
