"""The Celery task that applies a batch. Thin: decode, call the applier, own the retry policy.

Outcomes are counted per (source, target) in a Redis hash beside the queues, so that every
worker on every machine adds to one set of counters that `kvmesh status` reads.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis

from pipeline.celery_app import create_app
from pipeline.config import Settings
from pipeline.errors import MalformedBatchError, RetryableError
from pipeline.etcd import Etcd
from pipeline.fence import Decision
from pipeline.store import EtcdTargetStore
from pipeline.wire import TASK_NAME, Batch, decode_batch

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

    def count(self, source: str, target: str, outcome: str, ops: int = 0) -> None:
        self._check_pid()
        try:
            if self._redis is None:
                self._redis = redis.Redis.from_url(self._settings.broker.url)
            pipe = self._redis.pipeline(transaction=False)
            key = STATS_KEY.format(source=source, target=target)
            pipe.hincrby(key, outcome, 1)
            if ops:
                pipe.hincrby(key, "ops_applied", ops)
            pipe.execute()
        except redis.RedisError as exc:  # counters must never fail a batch
            log.warning("cannot record outcome %s: %s", outcome, exc)
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
    def apply_task(self: Any, payload: Any, gap_since: float | None = None) -> str:
        try:
            batch = decode_batch(payload)
            if batch.target not in targets:
                raise MalformedBatchError(f"unknown target cluster {batch.target!r}")
        except MalformedBatchError as exc:
            log.error("rejected task %s: %s", self.request.id, exc.reason)
            conns.count("-", "-", "malformed")
            return "malformed"
        try:
            decision = apply_batch(conns.store(batch.target), batch, gap_wait=worker.gap_wait)
        except RetryableError as exc:
            delay = min(worker.max_retry_delay, 0.2 * 2 ** min(self.request.retries, 10))
            log.warning(
                "%s→%s %s: %s; retrying in %.1fs",
                batch.source,
                batch.target,
                batch.shard,
                exc,
                delay,
            )
            conns.count(batch.source, batch.target, "retry_unavailable")
            raise self.retry(exc=exc, countdown=delay) from None
        if decision is Decision.GAP:
            now = time.time()
            since = gap_since or now
            if now - since < settings.sync.stall_timeout:
                conns.count(batch.source, batch.target, "gap_wait")
                raise self.retry(
                    args=(payload,),
                    kwargs={"gap_since": since},
                    countdown=worker.gap_retry_delay,
                )
            _resync(conns, batch, f"shard {batch.shard} stalled before {batch.prev}")
            decision_name = "stalled"
        elif decision is Decision.RESYNC:
            _resync(conns, batch, f"shard {batch.shard}: target lost its generation or fence")
            decision_name = decision.value
        else:
            decision_name = decision.value
        conns.count(
            batch.source,
            batch.target,
            decision_name,
            len(batch.ops) if decision is Decision.APPLY else 0,
        )
        return decision_name

    return apply_task


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
