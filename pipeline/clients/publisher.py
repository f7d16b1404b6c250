"""Publish batches as Celery tasks, by task name, on the source's queue."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
from kombu.exceptions import OperationalError

from pipeline.clients.broker import queue_depth
from pipeline.protocol.errors import PublishError, RetryableError
from pipeline.protocol.names import TASK_NAME
from pipeline.protocol.wire import Batch, Signer, encode_task_sized


class Publisher(Protocol):
    def publish(self, batches: Sequence[Batch], per_task: int = 0) -> None:
        """Publish the batches, *per_task* to a task (0: sync.batches_per_task)."""
        ...

    def backlog(self) -> int:
        """Tasks waiting in the queue (not counting those a worker holds)."""
        ...


# A task carries at most this many operations, however many batches: a worker applies a
# task's batches one transaction after another, so a flush of many full batches must spread
# over several tasks (and workers), while many small batches (one per target) share one.
# 4 transactions of full batches: with 8 (1,024), a pool through a 10 ms round trip drained
# a backlog about a tenth slower, and its start (small flushes that chain) half again as
# slow (docs/performance.md).
MAX_OPS_PER_TASK = 512


def group_batches(
    batches: Sequence[Batch], per_task: int, max_ops: int = MAX_OPS_PER_TASK
) -> list[list[Batch]]:
    """The batches in order, at most *per_task* and about *max_ops* operations to a task
    (a batch is never split; one larger than *max_ops* has a task of its own). A task may
    carry batches for several targets of its source (a flush of the watcher is one task for
    all of them, not one per target); the worker applies each in its own target's fenced
    transaction. Consecutive batches of one shard (a run) go into one task when they fit
    in a task of their own: split over two tasks, the second would wait for the first."""
    groups: list[list[Batch]] = []
    current: list[Batch] = []
    ops = 0
    for run in _runs(batches):
        if len(run) > 1 and current:
            run_ops = sum(len(b.ops) for b in run)
            if len(current) + len(run) > per_task or ops + run_ops > max_ops:
                groups.append(current)
                current, ops = [], 0
        for b in run:
            if current and (len(current) >= per_task or ops + len(b.ops) > max_ops):
                groups.append(current)
                current, ops = [], 0
            current.append(b)
            ops += len(b.ops)
    if current:
        groups.append(current)
    return groups


def _runs(batches: Sequence[Batch]) -> list[list[Batch]]:
    """The batches cut where the (target, shard) changes."""
    runs: list[list[Batch]] = []
    for b in batches:
        if runs and (runs[-1][-1].target, runs[-1][-1].shard) == (b.target, b.shard):
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


class CeleryPublisher:
    def __init__(
        self,
        app: Any,
        queue: str,
        client: redis.Redis,
        signer: Signer | None,
        batches_per_task: int = 8,
        on_task: Callable[[int], None] | None = None,
    ) -> None:
        self._app = app
        self._queue = queue
        self._per_task = batches_per_task
        self._redis = client
        self._signer = signer
        self._on_task = on_task  # told the size of each task payload published

    def backlog(self) -> int:
        try:
            return queue_depth(self._redis, self._queue)
        except redis.RedisError as exc:
            raise RetryableError(f"reading the depth of {self._queue} failed: {exc}") from None

    def publish(self, batches: Sequence[Batch], per_task: int = 0) -> None:
        """Publish every batch, or raise PublishError saying how many went out first."""
        if not batches:
            return
        sent = 0
        try:
            with self._app.producer_or_acquire() as producer:
                for group in group_batches(batches, per_task or self._per_task):
                    first = group[0]
                    payload, size = encode_task_sized(group, self._signer)
                    targets = sorted({b.target for b in group})
                    to = targets[0] if len(targets) == 1 else f"{len(targets)} targets"
                    self._app.send_task(
                        TASK_NAME,
                        args=[payload],
                        # Celery would repr() the whole payload for Flower; say what it is.
                        argsrepr=f"[{first.source}->{to} {len(group)} batches "
                        f"{sum(len(b.ops) for b in group)} ops]",
                        kwargsrepr="{}",
                        queue=self._queue,
                        routing_key=self._queue,
                        producer=producer,
                        # no retry in kombu: the watcher pauses and keeps the changes on any
                        # failure. Once, a publish after Redis refused a write for want of
                        # memory met a kombu channel without its connection, and the
                        # AttributeError ended the watcher's thread; kombu's retry path is
                        # the one that closes channels (docs/operations.md).
                        retry=False,
                    )
                    sent += len(group)
                    if self._on_task is not None:
                        self._on_task(size)
        except (OperationalError, OSError, redis.RedisError) as exc:
            raise PublishError(f"publishing to {self._queue} failed: {exc}", sent) from None
