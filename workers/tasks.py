"""The Celery task that applies a batch. Thin: decode, call the applier, own the retry policy.

Outcomes are counted per (source, target) in a Redis hash beside the queues, so that every
worker on every machine adds to one set of counters that `kvmesh status` reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

import redis

from pipeline.celery_app import create_app
from pipeline.config import Settings
from pipeline.errors import MalformedBatchError, RetryableError
from pipeline.etcd import Etcd
from pipeline.fence import Decision
from pipeline.store import EtcdTargetStore, TargetStore
from pipeline.wire import TASK_NAME, Batch, Operation, decode_task, encode_task

from .applier import apply_batch

log = logging.getLogger("kvmesh.worker")

STATS_KEY = "kvmesh:stats:{source}:{target}"  # STABLE API: read by `kvmesh status`


class _PerProcess:
    """Connections made lazily in the process that uses them: gRPC channels and sockets do
    not survive a fork, and prefork workers fork after the app is built."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pid = -1
        self._stores: dict[str, EtcdTargetStore] = {}
        self._redis: redis.Redis | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stores = {}
            self._redis = None

    def store(self, target: str) -> EtcdTargetStore:
        self._check_pid()
        store = self._stores.get(target)
        if store is None:
            cluster = self._settings.cluster(target)
            store = EtcdTargetStore(Etcd(cluster, self._settings.sync.etcd_timeout))
            self._stores[target] = store
        return store

    def count(self, source: str, target: str, outcome: str) -> None:
        self.record(source, target, Counter({outcome: 1}))

    def record(self, source: str, target: str, outcomes: Counter[str]) -> None:
        self._check_pid()
        try:
            if self._redis is None:
                self._redis = redis.Redis.from_url(self._settings.broker.url)
            pipe = self._redis.pipeline(transaction=False)
            key = STATS_KEY.format(source=source, target=target)
            for outcome, n in outcomes.items():
                if n:
                    pipe.hincrby(key, outcome, n)
            pipe.execute()
        except redis.RedisError as exc:  # counters must never fail a batch
            log.warning("cannot record outcomes %s: %s", dict(outcomes), exc)
            self._redis = None


def register_tasks(app: Any, settings: Settings) -> Any:
    """Register the apply task on *app*; returns the task."""
    conns = _PerProcess(settings)
    targets = {c.name for c in settings.targets}
    worker = settings.worker

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )
    def apply_task(self: Any, *args: Any, gap_since: float | None = None, **extra: Any) -> str:
        try:
            if len(args) != 1 or extra:
                raise MalformedBatchError(
                    f"expected one payload argument, got {len(args)} and {sorted(extra)}"
                )
            payload = args[0]
            batches = decode_task(payload)
            if batches[0].target not in targets:
                raise MalformedBatchError(f"unknown target cluster {batches[0].target!r}")
        except MalformedBatchError as exc:
            log.error("rejected task %s: %s", self.request.id, exc.reason)
            conns.count("-", "-", "malformed")
            return "malformed"
        first = batches[0]
        outcomes: Counter[str] = Counter()
        try:
            waiting = apply_all(conns.store(first.target), batches, outcomes, worker.gap_wait)
        except _Unavailable as exc:
            delay = min(worker.max_retry_delay, 0.2 * 2 ** min(self.request.retries, 10))
            log.warning(
                "%s→%s: %s; retrying %d batches in %.1fs",
                first.source,
                first.target,
                exc.cause,
                len(exc.remaining),
                delay,
            )
            conns.record(first.source, first.target, outcomes | Counter(retry_unavailable=1))
            raise self.retry(
                args=(encode_task(exc.remaining),), kwargs={}, countdown=delay
            ) from None
        if waiting:
            now = time.time()
            since = gap_since or now
            if now - since < settings.sync.stall_timeout:
                outcomes["gap_wait"] += len(waiting)
                conns.record(first.source, first.target, outcomes)
                raise self.retry(
                    args=(encode_task(waiting),),
                    kwargs={"gap_since": since},
                    countdown=worker.gap_retry_delay,
                )
            _resync(conns, waiting[0], f"shard {waiting[0].shard} stalled before {waiting[0].prev}")
            outcomes["stalled"] += len(waiting)
        if outcomes[Decision.RESYNC.value]:
            _resync(conns, first, "target lost its generation or fence")
        conns.record(first.source, first.target, outcomes)
        return " ".join(f"{k}={v}" for k, v in sorted(outcomes.items()) if k != "ops_applied")

    return apply_task


class _Unavailable(Exception):
    def __init__(self, cause: RetryableError, remaining: list[Batch]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.remaining = remaining


def apply_all(
    store: TargetStore, batches: list[Batch], outcomes: Counter[str], gap_wait: float
) -> list[Batch]:
    """Apply every batch it can, in passes: a batch whose predecessor is missing is tried
    again after the others, since another worker is usually applying that predecessor right
    now. Returns the batches still waiting after *gap_wait* seconds without progress."""
    pending = list(batches)
    deadline = time.monotonic() + gap_wait

    def reject(op: Operation, reason: str) -> None:
        outcomes["rejected_too_large"] += 1
        log.error(
            "%s→%s: not synced: key %s: %s",
            pending[0].source,
            pending[0].target,
            op.key.decode("utf-8", errors="backslashreplace"),
            reason,
        )

    delay = 0.002
    while pending:
        waiting: list[Batch] = []
        for i, batch in enumerate(pending):
            try:
                decision = apply_batch(store, batch, on_reject=reject)
            except RetryableError as exc:
                raise _Unavailable(exc, waiting + pending[i:]) from None
            if decision is Decision.GAP:
                waiting.append(batch)
                continue
            outcomes[decision.value] += 1
            if decision is Decision.APPLY:
                outcomes["ops_applied"] += len(batch.ops)
        if len(waiting) < len(pending):
            deadline = time.monotonic() + gap_wait  # progress: wait afresh
            delay = 0.002
        elif time.monotonic() >= deadline:
            return waiting
        else:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        pending = waiting
    return []


def _resync(conns: _PerProcess, batch: Batch, reason: str) -> None:
    log.warning("%s→%s: asking the watcher for a resync: %s", batch.source, batch.target, reason)
    try:
        conns.store(batch.target).request_resync(batch.source, batch.gen, reason)
    except RetryableError as exc:  # the watcher's own stall detection covers this case
        log.warning("cannot write the resync request: %s", exc)


def create_worker_app(settings: Settings) -> Any:
    """The Celery app with the apply task registered: what a worker process runs."""
    app = create_app(settings)
    register_tasks(app, settings)
    return app
