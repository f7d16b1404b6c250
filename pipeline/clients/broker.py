"""Redis: the broker's clients, and the few direct reads and writes kvmesh makes beside the
queues (queue depths, the workers' outcome counters), with Redis errors turned into
RetryableError. Celery itself is in pipeline.clients.celeryapp: a watcher never imports it.

Built from settings by factories; nothing is read from the environment here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import redis

from pipeline.config import Settings
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.names import stats_key

# A connection does not name its library to Redis (CLIENT SETINFO): that is two more round
# trips per connection, each a failed call in the commandstats of a Redis older than 7.2,
# and redis-py looks its own version up in the installed packages' metadata for each, 3-4 ms
# of CPU in a fresh process (a watcher's start, a pool process's first task). A redis-py
# with DriverInfo takes driver_info=None for that; the older ones lib_name and lib_version.
_QUIET: dict[str, Any] = (
    {"driver_info": None}
    if hasattr(redis, "DriverInfo")
    else {"lib_name": None, "lib_version": None}
)


def redis_at(
    url: str,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout: float = 5.0,
) -> redis.Redis:
    """A Redis client for *url* (user and password in it), with TLS files for rediss://."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    kwargs.update(_QUIET)
    if url.startswith("rediss://"):
        kwargs.update(
            ssl_cert_reqs="required",
            ssl_ca_certs=ca_file,
            ssl_certfile=cert_file,
            ssl_keyfile=key_file,
        )
    return redis.Redis.from_url(url, **kwargs)


def redis_client(settings: Settings, timeout: float = 5.0) -> redis.Redis:
    """A client of the broker's Redis (the leader lease, and Broker below), with the broker
    URL's user and password and, for rediss://, the broker's TLS files."""
    tls = settings.broker.tls
    return redis_at(settings.broker.url, tls.ca_file, tls.cert_file, tls.key_file, timeout)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Celery queue on Redis, over its priority sub-queues."""
    names = [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))


# what an outcome counter is called (workers write these names only)
_OUTCOME = re.compile(rb"[a-z][a-z_]{0,63}")


class Broker:
    """kvmesh's own reads and writes in the broker's Redis; every Redis error is a
    RetryableError."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def of(cls, settings: Settings) -> Broker:
        return cls(redis_client(settings))

    def _do(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise RetryableError(f"redis: {what} failed: {exc}") from None

    def ping(self) -> None:
        self._do("ping", self.client.ping)

    def depth(self, queue: str) -> int:
        """Tasks waiting in *queue* (not those a worker holds)."""
        return int(self._do("queue depth", lambda: queue_depth(self.client, queue)))

    def stats(self, source: str, target: str) -> dict[str, int]:
        """The workers' outcome counters of one pair; fields that are no outcome's name or
        not counts (written by someone else, who could have put escape sequences or line
        breaks there for `kvmesh status` to print) are left out."""
        raw = self._do("stats", lambda: self.client.hgetall(stats_key(source, target)))
        return {
            k.decode(): int(v)
            for k, v in raw.items()
            if _OUTCOME.fullmatch(k) and v.isdigit() and len(v) < 19
        }

    def add_stats(
        self, counts: Iterable[tuple[str, str, Mapping[str, int]]], drops: Sequence[str] = ()
    ) -> None:
        """Add each (source, target, outcomes) to that pair's outcome counters, and delete
        the payload strings *drops* (of tasks done with them; see payload), in one round
        trip. RetryableError if Redis did not answer or refused a counter; a refused delete
        is left to the payloads' expiry."""

        def add() -> None:
            pipe = self.client.pipeline(transaction=False)
            for source, target, outcomes in counts:
                for outcome, n in outcomes.items():
                    if n:
                        pipe.hincrby(stats_key(source, target), outcome, n)
            if drops:
                pipe.delete(*drops)
            results = pipe.execute(raise_on_error=False)
            refused = [r for r in results[: len(results) - bool(drops)] if isinstance(r, Exception)]
            if refused:
                raise refused[0]

        self._do("stats", add)

    def payload(self, key: str, limit: int) -> bytes | None:
        """The first *limit* + 1 bytes of the payload string *key*, or None if there is no
        such string (gone, or another type of key)."""
        try:
            raw = self.client.getrange(key, 0, limit)
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):  # not a string: no payload
                return None
            # NOPERM (an ACL without GETRANGE on kvmesh:payload:*), or anything else Redis
            # refuses: the payload may well be there; the task waits, it is not dropped
            raise RetryableError(f"redis: reading a task's payload was refused: {exc}") from None
        except redis.RedisError as exc:
            raise RetryableError(f"redis: reading a task's payload failed: {exc}") from None
        return cast(bytes, raw) or None  # redis_at's clients never decode responses

    def close(self) -> None:
        self.client.close()
