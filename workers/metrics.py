"""Prometheus metrics of a worker.

A Celery worker runs its tasks in pool processes forked from its main process. With
`[metrics] worker_port` set, the main process switches prometheus_client to its multiprocess
mode before the pool forks: every process writes its values to files in one directory, and
the main process serves their sum on the port. Counters of a pool process that ended (a
recycled child) stay in that sum, so nothing counted is lost while the worker runs; a
restart of the worker starts them again from zero, as Prometheus expects of counters.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

from pipeline.protocol.fence import FenceRecord
from pipeline.protocol.layout import parse_shard
from pipeline.protocol.wire import Batch, Operation
from workers.store import FenceView, Part, TargetStore

log = logging.getLogger("kvmesh.worker")

# from 1 ms (a loopback etcd) to a minute (a backlog): the lag's p50 and p99 both land
# inside a bucket in a healthy mesh and in a struggling one
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
OPERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        self.batches = Counter(
            "kvmesh_worker_batches_total",
            "Batches taken from tasks, by outcome (docs/metrics.md)",
            ["source_cluster", "target_cluster", "outcome"],
            registry=r,
        )
        self.ops = Counter(
            "kvmesh_worker_ops_applied_total",
            "Puts and deletes applied to the target",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.rejected_tasks = Counter(
            "kvmesh_worker_tasks_rejected_total",
            "Task messages dropped before anything was applied (reason: malformed, unsigned, "
            "bad_signature, unknown_key, payload_gone; refused by Celery: unknown_task, "
            "undecodable, invalid_task, unknown_format, unreceivable)",
            ["reason"],
            registry=r,
        )
        self.lag = Histogram(
            "kvmesh_sync_lag_seconds",
            "Seconds from the watcher receiving a source event to its commit in the target "
            "(per batch, from the oldest event of its shard in its flush)",
            ["source_cluster", "target_cluster"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "kvmesh_kvstore_sync_errors_total",
            "Batches that could not be written to the target: unreachable (retried), "
            "stalled (a resync was asked for) or forbidden",
            ["scope", "source_cluster", "target_cluster"],
            registry=r,
        )
        self.operations = Histogram(
            "kvmesh_kvstore_operations_duration_seconds",
            "Seconds per call to a target etcd (action: read, txn; scope: the resource of "
            "its shards, or mixed)",
            ["scope", "action", "outcome", "target_cluster"],
            buckets=OPERATION_BUCKETS,
            registry=r,
        )
        self.guesses = Counter(
            "kvmesh_worker_fence_guesses_total",
            "Group transactions that compared a fence with the record its batch's "
            "predecessor wrote instead of reading it first, by whether the compares held "
            "(failed: one more transaction, on the views the failed one read back)",
            ["target_cluster", "outcome"],
            registry=r,
        )
        self.concurrency = Gauge(
            "kvmesh_worker_concurrency",
            "Pool slots of the live worker processes",
            multiprocess_mode="livesum",
            registry=r,
        )

    def zero(self, sources: list[str], targets: list[str]) -> None:
        """Export the series alerts watch at 0 from the start (a series that first appears
        at 3 has no increase() in Prometheus)."""
        for reason in ("malformed", "unsigned", "bad_signature", "unknown_key", "payload_gone"):
            self.rejected_tasks.labels(reason)
        for source in sources:
            for target in targets:
                if source != target:
                    self.ops.labels(source, target)

    def record(self, source: str, target: str, outcomes: dict[str, int]) -> None:
        """Count one task's outcomes for a pair (the fields of the Redis stats hash)."""
        for outcome, n in outcomes.items():
            if not n:
                continue
            if outcome == "ops_applied":
                self.ops.labels(source, target).inc(n)
            else:
                self.batches.labels(source, target, outcome).inc(n)

    def failed(self, batches: Sequence[Batch]) -> None:
        for b in batches:
            self.errors.labels(scope_of([b.shard]), b.source, b.target).inc()

    def applied(self, batch: Batch, now: float | None = None) -> None:
        if batch.event_ms:
            now = time.time() if now is None else now
            self.lag.labels(batch.source, batch.target).observe(
                max(0.0, now - batch.event_ms / 1000)
            )


def scope_of(shards: Sequence[str]) -> str:
    """The `scope` label for a call that touches *shards*."""
    scopes = set()
    for shard in shards:
        parsed = parse_shard(shard)
        scopes.add(parsed[0].scope if parsed is not None else "unknown")
    return scopes.pop() if len(scopes) == 1 else "mixed"


class TimedStore:
    """A TargetStore that times every call into kvmesh_kvstore_operations_duration_seconds."""

    def __init__(
        self,
        store: TargetStore,
        metrics: WorkerMetrics,
        target: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._target = target
        self._clock = clock
        # how long this process's transactions on the target take lately (an exponential
        # average, 0 before the first): workers wait for a predecessor in those units
        self.txn_seconds = 0.0

    def _timed(self, shards: Sequence[str], action: str, call: Callable[[], object]) -> object:
        start = self._clock()
        outcome = "failure"
        try:
            result = call()
            outcome = "success"
            return result
        finally:
            took = self._clock() - start
            labels = (scope_of(shards), action, outcome, self._target)
            self._metrics.operations.labels(*labels).observe(took)
            if action == "txn" and outcome == "success":  # a timeout is no transaction time
                last = self.txn_seconds
                self.txn_seconds = took if last == 0 else 0.8 * last + 0.2 * took

    def read_fence(self, source: str, shard: str) -> FenceView:
        view = self._timed([shard], "read", lambda: self._store.read_fence(source, shard))
        assert isinstance(view, FenceView)
        return view

    def commit(
        self,
        source: str,
        shard: str,
        seen: FenceView,
        ops: Sequence[Operation],
        fence: FenceRecord | None,
        lease: int = 0,
    ) -> bool:
        return bool(
            self._timed(
                [shard],
                "txn",
                lambda: self._store.commit(source, shard, seen, ops, fence, lease),
            )
        )

    def read_fences(self, source: str, shards: Sequence[str]) -> dict[str, FenceView]:
        views = self._timed(shards, "read", lambda: self._store.read_fences(source, shards))
        assert isinstance(views, dict)
        return views

    def commit_group(
        self, source: str, gen_rev: int, parts: Sequence[Part], read_back: Sequence[str] = ()
    ) -> tuple[int, dict[str, FenceView]]:
        result = self._timed(
            [p.shard for p in parts],
            "txn",
            lambda: self._store.commit_group(source, gen_rev, parts, read_back),
        )
        assert isinstance(result, tuple)
        if any(p.expect is not None for p in parts):
            outcome = "held" if result[0] else "failed"
            self._metrics.guesses.labels(self._target, outcome).inc()
        return result

    def request_resync(self, source: str, gen: int, reason: str) -> None:
        self._store.request_resync(source, gen, reason)


class Exporter:
    """The worker's /metrics, /healthz and /readyz, served by its main process."""

    def __init__(self) -> None:
        self.directory: str | None = None
        self.ready = False

    def enable_multiprocess(self) -> str:
        """Switch prometheus_client to multiprocess mode in this process and the pool
        processes it forks from now on; returns the directory of the value files."""
        directory = tempfile.mkdtemp(prefix="kvmesh-worker-metrics-")
        atexit.register(shutil.rmtree, directory, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.directory = directory
        return directory

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return registry

    def unready(self) -> str | None:
        return None if self.ready else "starting: not consuming its queues yet"

    @staticmethod
    def process_ended(pid: int) -> None:
        """Drop the live gauges of a pool process that ended."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
