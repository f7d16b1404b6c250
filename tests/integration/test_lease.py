"""The leader lease's look at other sources' leases, against a real Redis: whether a watcher
may be syncing a source, which a drain waits on (pipeline/source/drain.py)."""

from __future__ import annotations

import pytest

from pipeline.clients.broker import redis_at
from pipeline.clients.lease import RedisLease, lease_held
from pipeline.protocol.names import leader_key

from ..harness import Servers

pytestmark = pytest.mark.integration


def test_a_source_is_watched_while_its_lease_has_a_value(servers: Servers) -> None:
    redis = servers.redis()
    client = redis_at(redis.url)
    assert lease_held(client, "cluster-x", ttl=5) is False
    lease = RedisLease(client, "cluster-x", 5)
    assert lease.acquire()
    assert lease_held(client, "cluster-x", ttl=5) is True
    assert lease_held(client, "cluster-y", ttl=5) is False
    lease.release()
    assert lease_held(client, "cluster-x", ttl=5) is False


def test_a_lease_value_nobody_renews_counts_for_one_ttl_at_most(servers: Servers) -> None:
    """A value written by hand, with no TTL or a long one, is taken as held, and given the
    lease's TTL: it cannot keep a drain waiting for longer unless someone keeps writing it."""
    client = redis_at(servers.redis().url)
    for ex in (None, 3600):
        client.set(leader_key("cluster-x"), b"\xff written by hand", ex=ex)
        assert lease_held(client, "cluster-x", ttl=5) is True
        assert 0 < client.pttl(leader_key("cluster-x")) <= 5000


def test_no_answer_from_redis_is_no_verdict(servers: Servers) -> None:
    redis = servers.redis()
    client = redis_at(redis.url, timeout=1.0)
    redis.stop()
    assert lease_held(client, "cluster-x", ttl=5) is None
