"""What a watcher's publisher makes of Redis's answers about the tasks a worker holds
(sync.flush_after_ack), with a scripted Redis: the answer is advisory, so nothing it says
may raise out of a look at the queue. Against a real Redis and kombu:
tests/integration/test_publisher.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from pipeline.clients.publisher import RedisPublisher
from pipeline.protocol.layout import Op
from pipeline.protocol.wire import Batch, Operation, Signer, SigningKeys

QUEUE = "kvmesh.cluster-a"


class ScriptedRedis:
    """LPUSH and LLEN as Redis does them; a pipeline's replies as the test sets them."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.replies: list[Any] = []
        self.pipelines = 0

    def lpush(self, _key: str, message: str) -> int:
        self.queue.append(message.encode())
        return len(self.queue)

    def llen(self, _key: str) -> int:
        return len(self.queue)

    def pipeline(self, transaction: bool = True) -> ScriptedRedis:
        self.pipelines += 1
        return self

    def zmscore(self, _key: str, _members: list[str]) -> None:
        pass

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        return list(self.replies)


def publisher() -> tuple[RedisPublisher, ScriptedRedis]:
    client = ScriptedRedis()
    return RedisPublisher(QUEUE, client, Signer(SigningKeys((b"k" * 32,)))), client  # type: ignore[arg-type]


def batch(shard: str = "nodes-0") -> Batch:
    ops = (Operation(Op.PUT, b"cilium/cache/nodes/v1/cluster-a/n", b"{}"),)
    return Batch("cluster-a", "cluster-b", shard, 7, (1, 0), (2, 1), ops)


def test_no_tracked_task_of_the_shards_asked_about_costs_no_pipeline() -> None:
    """Only the LLEN goes while no tracked task has one of the shards asked about."""
    pub, client = publisher()
    pub.publish([batch("nodes-0")], track=True)
    pub.publish([batch("nodes-1")], track=False)
    assert pub.backlog({"nodes-1"}) == 2
    assert pub.backlog() == 2
    assert client.pipelines == 0
    client.replies = [2, [None]]
    assert pub.backlog({"nodes-0"}) == 2
    assert client.pipelines == 1


@pytest.mark.parametrize(
    "reply",
    [
        [1.5],  # one score for two tags
        ["not a score", None],
        {"a": 1},
        redis.ResponseError("LOADING Redis is loading the dataset in memory"),
    ],
    ids=["short", "junk", "not-a-list", "transient"],
)
def test_an_answer_it_cannot_read_says_no_shard_is_busy(reply: Any) -> None:
    """A reply of the wrong length or type, or a passing error, says no shard is busy, and
    raises nothing; the tasks stay tracked for the next look."""
    pub, client = publisher()
    pub.publish([batch("nodes-0"), batch("nodes-1")], per_task=1, track=True)
    client.replies = [2, reply]
    assert pub.backlog({"nodes-0", "nodes-1"}) == 2
    assert pub.busy_shards() == set()
    client.replies = [0, [1.0, None]]
    assert pub.backlog({"nodes-0", "nodes-1"}) == 0
    assert pub.busy_shards() == {"nodes-0"}


def test_a_redis_without_zmscore_ends_the_tracking_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis older than 6.2 answers ZMSCORE with an unknown command: the publisher says
    so once and tracks nothing from then on (no pipeline again)."""
    pub, client = publisher()
    pub.publish([batch()], track=True)
    client.replies = [
        1,
        redis.ResponseError("unknown command 'ZMSCORE', with args beginning with:"),
    ]
    with caplog.at_level(logging.WARNING, logger="kvmesh.watcher"):
        assert pub.backlog({"nodes-0"}) == 1
        pub.publish([batch()], track=True)
        assert pub.backlog({"nodes-0"}) == 2
    assert client.pipelines == 1
    assert pub.busy_shards() == set()
    assert not pub.tracks({"nodes-0"})  # tracking is off: the tracked publish kept nothing
    assert [r.getMessage() for r in caplog.records] == [
        f"{QUEUE}: cannot tell which of its tasks the workers hold (unknown command "
        "'ZMSCORE', with args beginning with:): flushes no longer wait for the workers to "
        "finish their shards' last tasks"
    ]


def test_a_refused_length_is_no_figure_and_no_busy_shard() -> None:
    """An error for the LLEN in the pipeline is the queue's length unread, as without
    tracking."""
    pub, client = publisher()
    pub.publish([batch()], track=True)
    client.replies = [redis.ResponseError("NOPERM llen"), [1.0]]
    from pipeline.protocol.errors import RetryableError

    with pytest.raises(RetryableError):
        pub.backlog({"nodes-0"})
    assert pub.busy_shards() == set()
