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


def test_a_lease_value_without_a_ttl_is_given_one_and_no_ttl_is_shortened(
    servers: Servers,
) -> None:
    """A value written by hand with no TTL is taken as held and given the lease's TTL: it
    cannot keep a drain waiting for long unless someone keeps writing it. A value with a
    TTL keeps it, however long: a watcher with a longer sync.leader_ttl must not lose its
    lease between renewals to another's look."""
    client = redis_at(servers.redis().url)
    key = leader_key("cluster-x")
    client.set(key, b"\xff written by hand")
    assert lease_held(client, "cluster-x", ttl=5) is True
    assert 0 < client.pttl(key) <= 5000
    client.set(key, b"a watcher of a longer leader_ttl", px=60_000)
    assert lease_held(client, "cluster-x", ttl=5) is True
    assert client.pttl(key) > 55_000


def test_no_answer_from_redis_is_no_verdict(servers: Servers) -> None:
    redis = servers.redis()
    client = redis_at(redis.url, timeout=1.0)
    redis.stop()
    assert lease_held(client, "cluster-x", ttl=5) is None
