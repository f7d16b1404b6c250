"""Publish batches as Celery tasks, by task name, on the source's queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import redis
from kombu.exceptions import OperationalError

from .errors import RetryableError
from .wire import TASK_NAME, Batch


class Publisher(Protocol):
    def publish(self, batches: Sequence[Batch]) -> None: ...

    def backlog(self) -> int:
        """Tasks waiting in the queue (not counting those a worker holds)."""
        ...


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Celery queue on Redis, over its priority sub-queues."""
    names = [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))


class CeleryPublisher:
    def __init__(self, app: Any, queue: str, broker_url: str) -> None:
        self._app = app
        self._queue = queue
        self._redis = redis.Redis.from_url(broker_url, socket_timeout=5)

    def backlog(self) -> int:
        try:
            return queue_depth(self._redis, self._queue)
        except redis.RedisError as exc:
            raise RetryableError(f"reading the depth of {self._queue} failed: {exc}") from None

    def publish(self, batches: Sequence[Batch]) -> None:
        if not batches:
            return
        try:
            with self._app.producer_or_acquire() as producer:
                for b in batches:
                    self._app.send_task(
                        TASK_NAME,
                        args=[b.encode()],
                        queue=self._queue,
                        routing_key=self._queue,
                        producer=producer,
                        retry=True,
                        retry_policy={
                            "max_retries": 3,
                            "interval_start": 0.2,
                            "interval_step": 0.5,
                            "interval_max": 2,
                        },
                    )
        except (OperationalError, OSError) as exc:
            raise RetryableError(f"publishing to {self._queue} failed: {exc}") from None


class ListPublisher:
    """Collects batches in memory (tests of the watcher logic)."""

    def __init__(self) -> None:
        self.published: list[Batch] = []

    def publish(self, batches: Sequence[Batch]) -> None:
        self.published.extend(batches)

    def backlog(self) -> int:
        return 0
