"""Prometheus metrics of a watcher, built on an injected registry (never module globals).

Names carry units and `_total` on counters; labels are `source_cluster`, `target_cluster`.
"""

from __future__ import annotations

from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.clients.metrics_http import exposition, serve


class WatcherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "kvmesh_watcher_events_total",
            "Source watch events received",
            ["source_cluster", "resource"],
            registry=r,
        )
        self.rejected = Counter(
            "kvmesh_watcher_rejected_total",
            "Source keys not synced because they are bad input (reason: layout, too_large)",
            ["source_cluster", "reason"],
            registry=r,
        )
        self.batches = Counter(
            "kvmesh_watcher_batches_published_total",
            "Batches published as Celery tasks",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.ops = Counter(
            "kvmesh_watcher_ops_published_total",
            "Puts and deletes published",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.resyncs = Counter(
            "kvmesh_watcher_resyncs_total",
            "Generations opened with a full list-and-diff, by cause (see docs/metrics.md)",
            ["source_cluster", "target_cluster", "reason"],
            registry=r,
        )
        self.resync_keys = Counter(
            "kvmesh_watcher_resync_keys_total",
            "Keys a resync found to differ (kind: missing, different, extra)",
            ["source_cluster", "target_cluster", "kind"],
            registry=r,
        )
        self.resumes = Counter(
            "kvmesh_watcher_resumes_total",
            "Generations opened by resuming from the fences",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.generation = Gauge(
            "kvmesh_watcher_generation",
            "Current generation per pair",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.source_revision = Gauge(
            "kvmesh_watcher_source_revision",
            "Highest source revision delivered to the watcher",
            ["source_cluster"],
            registry=r,
        )
        self.applied_revision = Gauge(
            "kvmesh_watcher_applied_revision",
            "Source revision the target is known to reflect completely",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.initial_sync = Gauge(
            "kvmesh_watcher_initial_sync_completed",
            "1 once every resource's snapshot landed in the target in this generation",
            ["source_cluster", "target_cluster"],
            registry=r,
        )

        self.active = Gauge(
            "kvmesh_watcher_active",
            "1 while this watcher holds the source's lease and syncs, 0 while it is a standby",
            ["source_cluster"],
            registry=r,
        )
        self.source_failures = Counter(
            "kvmesh_watcher_source_failures_total",
            "Failed calls to the source etcd, and watch streams that broke or went silent",
            ["source_cluster"],
            registry=r,
        )
        self.stalls = Counter(
            "kvmesh_watcher_stalls_total",
            "Shards found behind with a fence that did not move for sync.stall_timeout",
            ["source_cluster", "target_cluster"],
            registry=r,
        )

        self.publish_paused = Counter(
            "kvmesh_watcher_publish_paused_total",
            "Times publishing paused (reason: queue_full, the source queue held "
            "sync.max_queue_depth tasks or sync.max_queue_bytes of them; broker_error, the "
            "broker refused a publish: out of memory, unreachable)",
            ["source_cluster", "reason"],
            registry=r,
        )
        self.resync_requests = Counter(
            "kvmesh_watcher_resync_requests_total",
            "Resync requests found in a target (outcome: honoured, stale: for a generation "
            "already replaced, ignored: unreadable or for a generation nobody opened)",
            ["source_cluster", "target_cluster", "outcome"],
            registry=r,
        )

        self.tasks = Counter(
            "kvmesh_watcher_tasks_published_total",
            "Celery tasks published on the source's queue (messages through the broker)",
            ["source_cluster"],
            registry=r,
        )
        self.flushes_held = Counter(
            "kvmesh_watcher_flushes_held_total",
            "Flushes that waited for a worker to finish the last task of a shard they had "
            "changes for (sync.flush_after_ack)",
            ["source_cluster"],
            registry=r,
        )
        self.flush_held_seconds = Counter(
            "kvmesh_watcher_flush_held_seconds_total",
            "Seconds those flushes waited, past when they were due",
            ["source_cluster"],
            registry=r,
        )
        self.task_bytes = Counter(
            "kvmesh_watcher_task_bytes_published_total",
            "Bytes of the JSON payloads of those tasks",
            ["source_cluster"],
            registry=r,
        )
        self.broker_bytes = Counter(
            "kvmesh_watcher_broker_bytes_written_total",
            "Bytes written to the broker for those tasks: each message as pushed (Celery's "
            "envelope around the payload or its reference), and each payload stored by "
            "reference",
            ["source_cluster"],
            registry=r,
        )
        self.waiting_source_canary = Gauge(
            "kvmesh_watcher_waiting_source_canary",
            "1 while a resource waits for its source canary (the source advertises synced "
            "canaries and has not written this one): nothing of it is deleted from the "
            "caches, and its target canary is not written",
            ["source_cluster", "resource"],
            registry=r,
        )
        self.config_refused = Gauge(
            "kvmesh_watcher_source_config_refused",
            "1 while the source holds a cluster config kvmesh refuses (an id other than the "
            "configured one, another maxConnectedClusters, not JSON...): no target gets it",
            ["source_cluster"],
            registry=r,
        )
        self.held_deletes = Counter(
            "kvmesh_watcher_held_deletes_total",
            "Deletes not sent while their resource waited for its source canary (the resync "
            "that follows the canary sends what is still owed)",
            ["source_cluster"],
            registry=r,
        )

        self.cache_leases = Gauge(
            "kvmesh_watcher_cache_leases",
            "Etcd leases the cached keys of the source sit on in the target "
            "(sync.cache_lease_ttl), as of the last fence poll",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.drain_waits = Counter(
            "kvmesh_watcher_drain_waits_total",
            "Drain checks that left a source missing from the config alone, because a watcher "
            "may still be syncing it (its lease has a value, or Redis did not answer)",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.errors = Counter(
            "kvmesh_watcher_errors_total",
            "Unexpected errors the watcher survived (where: fence_poll, drain); each is "
            "logged with its traceback and its target resynced",
            ["source_cluster", "where"],
            registry=r,
        )

        self.queue_depth = Gauge(
            "kvmesh_watcher_queue_depth",
            "Tasks waiting in the source's queue, as the active watcher last read it",
            ["source_cluster"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            "kvmesh_watcher_queue_bytes",
            "Bytes written to the broker for the tasks waiting in the source's queue, of "
            "those this watcher published, as it last read the queue's depth",
            ["source_cluster"],
            registry=r,
        )

        # KVStoreMesh's metrics (cilium_kvstoremesh_*), under kvmesh_ with its label names;
        # docs/metrics.md maps each
        self.bootstrap = Gauge(
            "kvmesh_bootstrap_seconds",
            "Seconds from the start of this watcher's term to the initial sync of the "
            "source in every target",
            ["source_cluster"],
            registry=r,
        )
        self.remote_clusters = Gauge(
            "kvmesh_remote_clusters",
            "Source clusters this process watches",
            registry=r,
        )
        self.readiness = Gauge(
            "kvmesh_remote_cluster_readiness_status",
            "1 while this watcher is active and the target holds the source's initial sync",
            ["source_cluster", "target_cluster"],
            registry=r,
        )
        self.failures = Gauge(
            "kvmesh_remote_cluster_failures",
            "Failures of the source since the process started (as "
            "kvmesh_watcher_source_failures_total)",
            ["source_cluster"],
            registry=r,
        )
        self.last_failure = Gauge(
            "kvmesh_remote_cluster_last_failure_ts",
            "Unix time of the source's last failure",
            ["source_cluster"],
            registry=r,
        )
        self.sync_queue = Gauge(
            "kvmesh_kvstore_sync_queue_size",
            "Changes the watcher holds and has not published yet (the most behind target)",
            ["scope", "source_cluster"],
            registry=r,
        )
        self.scope_synced = Gauge(
            "kvmesh_kvstore_initial_sync_completed",
            "1 once the resource was listed in the source (action=read) or its canary "
            "written in every target (action=write) in the current term",
            ["scope", "source_cluster", "action"],
            registry=r,
        )
        self.events_queue = Histogram(
            "kvmesh_kvstore_events_queue_seconds",
            "Seconds a watch event waited between its delivery and the watcher taking it",
            ["scope", "action"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def serve(self, port: int, bind: str, unready: Callable[[], str | None]) -> ThreadingHTTPServer:
        """Serve /metrics, /healthz and /readyz (see pipeline.clients.metrics_http).
        Raises OSError if the port cannot be bound."""
        return serve(port, bind, exposition(self.registry), unready)
