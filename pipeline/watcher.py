"""The watcher of one source cluster: list and watch its synced prefixes, filter and rewrite,
coalesce per shard, cut batches, and publish them for every target under that target's
current generation. It also owns each target's generations, resyncs and synced canaries.

One thread (run()) owns all state. Watch streams run on threads of their own and only hand
responses over through a queue, tagged with the stream epoch so that responses of a replaced
stream are ignored.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from etcd3 import transactions

from .batching import Change, ShardBuffer, make_batches
from .config import READ, WRITE, ClusterConfig, Settings
from .drain import drain_removed
from .errors import (
    BadInputError,
    CompactedError,
    CorruptRecordError,
    MalformedBatchError,
    PublishError,
    RetryableError,
)
from .etcd import Etcd, Event, WatchStream
from .fence import FenceRecord, GenRecord, Position
from .layout import (
    RESOURCE_BY_NAME,
    RESOURCES,
    Op,
    Resource,
    canary_key,
    draining_key,
    fence_key,
    gen_key,
    progress_key,
    rejected_prefix,
    resync_key,
    state_prefix,
)
from .leader import AlwaysLeader, Lease
from .metrics import WatcherMetrics
from .publisher import Publisher
from .sharding import all_shards, shard_of, shard_resource
from .snapshot import SnapshotCutter, convert, iter_source, read_target, target_shard
from .wire import Batch, Signer

log = logging.getLogger("kvmesh.watcher")

END = 1 << 31  # an index past every event of a revision: (rev, END) covers all of rev
_FLUSH_AT = 8192  # pending changes that force a flush before the linger ends
_PROGRESS_HEARTBEAT = 30.0  # seconds between progress writes when nothing synced changed


class Cause(StrEnum):
    """Why a target is owed a resync. STABLE API: the `reason` label of
    kvmesh_watcher_resyncs_total, which operators alert on."""

    START = "start"  # a term begins and the target has not been assessed yet
    NO_GENERATION = "no_generation"  # the target holds no generation record of this source
    SETTINGS_CHANGED = "settings_changed"  # shards or identities mode differ from the record
    SOURCE_REPLACED = "source_replaced"  # the source etcd is another cluster, or lost history
    FENCES_INCOMPLETE = "fences_incomplete"  # a fence is missing, older, or inside a snapshot
    FENCES_AHEAD = "fences_ahead"  # a fence is past the source's revision
    TARGET_UNAVAILABLE = "target_unavailable"  # the target could not be reached at start
    TARGET_WIPED = "target_wiped"  # the target lost its kvmesh records while synced
    GENERATION_MOVED = "generation_moved"  # another watcher opened a newer generation
    REQUESTED = "requested"  # a worker asked for it (a stalled chain or a lost record)
    STALLED = "stalled"  # a shard behind, its fence still, the queue empty: lost tasks
    ANTI_ENTROPY = "anti_entropy"  # the periodic resync (sync.resync_interval)
    COMPACTED = "compacted"  # the source's history was compacted past the watch
    CORRUPT_RECORD = "corrupt_record"  # a kvmesh record in the target does not decode


@dataclass
class Target:
    """What the watcher knows about one target of its source."""

    cluster: ClusterConfig
    etcd: Etcd
    gen: int = 0
    gen_rev: int = 0
    chain: dict[str, Position] = field(default_factory=dict)  # last pos published per shard
    skip: dict[str, Position] = field(default_factory=dict)  # events at/below are covered
    need_resync: Cause | None = Cause.START  # set while a resync is owed
    resync_detail: str = ""  # what the log says about the cause
    snapshot_rev: int = 0
    canaried: set[str] = field(default_factory=set)
    fence_pos: dict[str, Position] = field(default_factory=dict)
    behind_since: dict[str, float] = field(default_factory=dict)  # shard -> since when behind
    progress_rev: int = 0
    progress_at: float = 0.0  # when the progress record was last written
    # changes owed to this target and not cut into batches yet (its queue is full, or the
    # broker failing); coalesced per key, so bounded by the keyspace, never by time
    outbox: ShardBuffer = field(default_factory=ShardBuffer)
    # batches cut and chained but not known to be published: sent again as they are, so a
    # publish that did land after all is only a duplicate
    unsent: list[Batch] = field(default_factory=list)
    last_resync_at: float = -1e9
    resync_spacing: float = 0.0
    resync_after: float = 0.0  # resyncs of this target wait until then (see _space_resyncs)

    @property
    def name(self) -> str:
        return self.cluster.name

    def owe(self, cause: Cause, detail: str = "") -> None:
        """Mark the target for a resync (a cause already owed is kept)."""
        if self.need_resync is None:
            self.need_resync, self.resync_detail = cause, detail


class Watcher:
    def __init__(
        self,
        settings: Settings,
        source: ClusterConfig,
        publisher: Publisher,
        metrics: WatcherMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        lease: Lease | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.source = source
        self.layout = settings.layout_of(source)
        self.publisher = publisher
        self.signer = signer  # verifies the workers' resync requests (None: insecure mode)
        self.metrics = metrics or WatcherMetrics()
        self.clock = clock
        self.shards = all_shards(settings.sync.shards)
        self.etcd = Etcd(source, settings.sync.etcd_timeout, READ)  # never writes a source
        self.targets = [
            Target(c, Etcd(c, settings.sync.etcd_timeout, WRITE))
            for c in settings.targets_of(source.name)
        ]
        self.buffer = ShardBuffer()
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.streams: dict[str, WatchStream] = {}
        self.epoch = 0
        self.delivered: dict[str, int] = {}  # per resource: every event up to here was seen
        self._last_event_rev = 0  # newest revision of any event of the watched prefixes
        self._publish_after = 0.0  # publishing paused until then (broker full or failing)
        self._publish_backoff = 0.0
        self._queue_sample = (0.0, 0)  # (when, depth) of the last look at the queue
        self._resync_after = 0.0  # failed resyncs back off until then
        self._resync_backoff = 0.0
        self._config_rev = 0  # mod revision of the source's cluster config, as last seen
        self.source_cluster_id = 0
        self.stop_event = threading.Event()
        self._flush_deadline: float | None = None
        self._next_tick = 0.0
        self._next_progress = 0.0
        self._next_antientropy = 0.0
        self._next_drain = 0.0
        self._extra_clients: dict[str, Etcd] = {}
        self.lease: Lease = lease or AlwaysLeader()
        self._standby_logged = False
        # The lease is renewed on a thread of its own, so that one slow etcd call of the main
        # loop (up to sync.etcd_timeout; a partitioned target makes several in a row) does
        # not cost the lease. The main loop beats a heart; a loop that has not beaten for
        # _stuck_after seconds is hung, and then the lease is left to expire.
        self._in_term = threading.Event()
        self._lease_lost = threading.Event()
        self._beat = 0.0
        self._stuck_after = 3 * settings.sync.etcd_timeout + settings.sync.leader_ttl

    @property
    def name(self) -> str:
        return self.source.name

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()
        self.inbox.put(("wake",))

    def close(self) -> None:
        self._stop_streams()
        self.etcd.close()
        for t in self.targets:
            t.etcd.close()
        for etcd in self._extra_clients.values():
            etcd.close()

    def run(self) -> None:
        """Run until stop() is called: wait as a standby until this watcher holds the
        source's lease, then sync; step down when the lease cannot be renewed."""
        src = self.source.name
        keeper = threading.Thread(target=self._renew_loop, name=f"lease:{src}", daemon=True)
        keeper.start()
        try:
            while not self.stop_event.is_set():
                if not self.lease.acquire():
                    self.metrics.active.labels(src).set(0)
                    if not self._standby_logged:
                        log.info("%s: standby; %s is active", src, self.lease.holder() or "nobody")
                        self._standby_logged = True
                    self.stop_event.wait(min(1.0, self.sync.leader_ttl / 4))
                    continue
                self._standby_logged = False
                log.info("%s: active (lease %s)", src, self.lease.owner)
                self.metrics.active.labels(src).set(1)
                self._beat = self.clock()
                self._lease_lost.clear()
                self._in_term.set()
                try:
                    self._serve()
                finally:
                    self._in_term.clear()
                self.metrics.active.labels(src).set(0)
        finally:
            self.metrics.active.labels(src).set(0)
            keeper.join(timeout=self.sync.leader_ttl)
            self.lease.release()
            self.close()

    def _renew_loop(self) -> None:
        """Renew the lease every third of its TTL while a term runs and the main loop is
        not hung; otherwise tell the main loop to step down."""
        while not self.stop_event.wait(self.sync.leader_ttl / 3):
            if not self._in_term.is_set():
                continue
            hung = self.clock() - self._beat > self._stuck_after
            if hung:
                log.error(
                    "%s: the sync loop has not moved for %.0fs; letting the lease go",
                    self.source.name,
                    self.clock() - self._beat,
                )
            if hung or not self.lease.renew():
                self._in_term.clear()
                self._lease_lost.set()

    def _serve(self) -> None:
        """One term as the active watcher."""
        backoff = 0.2
        while not self.stop_event.is_set():
            if not self._keep_lease():
                return
            try:
                self.start()
                break
            except RetryableError as exc:
                if exc.cluster == self.source.name:
                    self.metrics.source_failures.labels(self.source.name).inc()
                log.warning(
                    "%s: start failed: %s; retrying in %.1fs", self.source.name, exc, backoff
                )
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        while not self.stop_event.is_set() and self._keep_lease():
            self.step()

    def _keep_lease(self) -> bool:
        """Beat the heart; if the lease was lost, step down to standby."""
        self._beat = self.clock()
        if not self._lease_lost.is_set():
            return True
        log.warning("%s: lost the lease; stepping down to standby", self.source.name)
        self._stop_streams()
        self.epoch += 1
        self.buffer.drain()
        self._flush_deadline = None
        for t in self.targets:
            t.need_resync, t.resync_detail = Cause.START, ""
        return False

    def start(self) -> None:
        """Open a generation in every target, resuming from fences where possible, then
        start the watches."""
        rev, self.source_cluster_id = self.etcd.header()
        starts: list[int] = []
        for t in self.targets:
            try:
                start = self._open_generation(t, allow_resume=True, source_rev=rev)
            except RetryableError as exc:
                log.warning("%s→%s: target unavailable: %s", self.source.name, t.name, exc)
                t.owe(Cause.TARGET_UNAVAILABLE, str(exc))
                continue
            if start is not None:
                starts.append(start)
        pending = [t for t in self.targets if t.need_resync]
        snapshot_rev = self._resync(pending) if pending else None
        if snapshot_rev is not None:
            starts.append(snapshot_rev + 1)
        if not starts:  # no target reachable yet: watch from now; they will be resynced
            starts.append(rev + 1)
        self._start_streams(min(starts))

    # -- main loop ---------------------------------------------------------------------------

    def step(self) -> None:
        """One pass of the main loop: take what the streams delivered, flush when due, tick."""
        now = self.clock()
        wait = max(0.0, min(self._next_tick, self._next_progress) - now)
        if self._flush_deadline is not None:
            wait = min(wait, max(0.0, self._flush_deadline - now))
        try:
            item = self.inbox.get(timeout=wait)
            self._handle(item)
            while len(self.buffer) < _FLUSH_AT:
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass
        now = self.clock()
        if self._flush_deadline is not None and (
            now >= self._flush_deadline or len(self.buffer) >= _FLUSH_AT
        ):
            self.flush()
        if now >= self._next_progress:
            # Half a poll before each tick, so the tick sees fresh watch progress.
            self._next_progress = now + self.sync.fence_poll_interval
            for name, stream in list(self.streams.items()):
                silent = time.monotonic() - stream.last_response
                if silent > self.sync.watch_timeout:
                    # every progress request gets an answer from a live etcd: a stream this
                    # quiet is cut off (a partition), so replace it rather than hang
                    stream.stop()
                    self._stream_failed(
                        name, RetryableError(f"watch of {name} silent for {silent:.0f}s")
                    )
                else:
                    stream.request_progress()
        if now >= self._next_tick:
            self._next_tick = now + self.sync.fence_poll_interval
            self.tick()

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "wake":
            return
        epoch = item[1]
        if epoch != self.epoch:
            return  # from a stream that was replaced
        if kind == "events":
            _, _, res_name, events, header_rev = item
            self.ingest(RESOURCE_BY_NAME[res_name], events, header_rev)
        elif kind == "error":
            _, _, res_name, exc, stream = item
            if stream is not None and self.streams.get(res_name) is not stream:
                return  # a stream already replaced
            self._stream_failed(res_name, exc, stream)

    def ingest(self, resource: Resource, events: list[Event], header_rev: int) -> None:
        """Filter, rewrite and buffer one watch response."""
        name = resource.name
        if events:
            self.metrics.events.labels(self.source.name, name).inc(len(events))
            self.delivered[name] = max(self.delivered.get(name, 0), events[-1].revision)
            self._last_event_rev = max(self._last_event_rev, events[-1].revision)
        else:  # a progress notification: everything up to header_rev was delivered
            self.delivered[name] = max(self.delivered.get(name, 0), header_rev)
        for ev in events:
            try:
                tkey, tvalue = convert(
                    self.layout, resource, ev.key, ev.value, self.sync.max_batch_bytes
                )
            except BadInputError as exc:
                self._reject(exc)
                if ev.value is None:
                    continue
                # A key that became too large must not leave its old value cached.
                try:
                    tkey = self.layout.rewrite(resource, ev.key)
                except BadInputError:
                    continue
                tvalue = None
            op = Op.PUT if tvalue is not None else Op.DELETE
            if resource.single_key:
                self._config_rev = ev.revision if ev.value is not None else 0
            shard = shard_of(resource, tkey, self.sync.shards)
            self.buffer.add(shard, Change(tkey, op, tvalue, (ev.revision, ev.index)))
        if len(self.buffer) and self._flush_deadline is None:
            self._flush_deadline = self.clock() + self.sync.linger
        if self.delivered:
            self.metrics.source_revision.labels(self.source.name).set(max(self.delivered.values()))

    def _reject(self, exc: BadInputError) -> None:
        self.metrics.rejected.labels(self.source.name, exc.kind).inc()
        log.warning("%s: not synced: %s", self.source.name, exc)

    def flush(self) -> None:
        """Hand the buffered changes to every target's outbox, cut them into batches and
        publish them, unless the broker is full or failing: then publishing pauses, with a
        growing delay, the outboxes keep coalescing what comes meanwhile, and batches already
        cut wait in `unsent` to go out as they are. Nothing is dropped, and no resync is
        started for it."""
        self._flush_deadline = None
        drained = self.buffer.drain()
        for t in self.targets:
            if t.need_resync:
                t.outbox.drain()  # its coming snapshot covers these changes
                t.unsent = []
                continue
            for shard, changes in drained.items():
                for c in changes:
                    if c.pos > t.skip[shard]:
                        t.outbox.add(shard, c)
        pending = [t for t in self.targets if t.unsent or len(t.outbox)]
        if not pending:
            return
        now = self.clock()
        if now < self._publish_after or self._queue_full(now):
            self._flush_deadline = max(self._publish_after, now + 0.5)
            return
        for t in pending:
            try:
                if t.unsent:
                    batches, t.unsent = t.unsent, []
                    self._send(t, batches)
                if len(t.outbox):
                    self._publish_chains(t, t.outbox.drain(), snapshot=False)
            except PublishError as exc:
                self._pause_publishing("broker_error", f"publishing to {t.name} failed: {exc}")
                self._flush_deadline = self._publish_after
                return
        self._publish_backoff = 0.0

    def _queue_full(self, now: float) -> bool:
        """Whether the source queue holds sync.max_queue_depth tasks or more (looked at no
        more than twice a second)."""
        when, depth = self._queue_sample
        if now - when >= 0.5:
            try:
                depth = self.publisher.backlog()
            except RetryableError:
                depth = 0  # the publish itself will tell
            self._queue_sample = (now, depth)
        if depth >= self.sync.max_queue_depth:
            self._pause_publishing("queue_full", f"its queue holds {depth} tasks")
            return True
        return False

    def _pause_publishing(self, reason: str, why: str) -> None:
        self._publish_backoff = min(max(0.5, self._publish_backoff * 2), 10.0)
        self._publish_after = self.clock() + self._publish_backoff
        self.metrics.publish_paused.labels(self.source.name, reason).inc()
        log.warning(
            "%s: publishing paused for %.1fs: %s", self.source.name, self._publish_backoff, why
        )

    def _publish_chains(self, t: Target, per_shard: dict[str, list[Change]], snapshot: bool) -> int:
        """Cut each shard's changes into batches chained after the shard's last one, and
        publish them interleaved across shards: consecutive tasks then belong to different
        shards, so parallel workers rarely wait on a predecessor."""
        chains: list[list[Batch]] = []
        for shard, changes in per_shard.items():
            if changes:
                chain = make_batches(
                    source=self.source.name,
                    target=t.name,
                    shard=shard,
                    gen=t.gen,
                    prev=t.chain[shard],
                    changes=changes,
                    max_ops=self.sync.max_batch_ops,
                    max_bytes=self.sync.max_batch_bytes,
                    snapshot=snapshot,
                )
                t.chain[shard] = chain[-1].pos  # the next batch follows these, sent or not
                chains.append(chain)
        if not chains:
            return 0
        ordered = [b for row in itertools.zip_longest(*chains) for b in row if b is not None]
        self._send(t, ordered)
        return len(ordered)

    def _send(self, t: Target, batches: list[Batch]) -> None:
        """Publish batches already chained; on a failure keep the rest in t.unsent, in
        order. A publish the broker took although it reported an error is then sent twice,
        which the fence makes a duplicate: the batch is the same, never re-cut."""
        published = batches
        try:
            self.publisher.publish(batches)
        except PublishError as exc:
            published = batches[: exc.published]
            t.unsent = batches[exc.published :]
            raise
        finally:
            self.metrics.batches.labels(self.source.name, t.name).inc(len(published))
            self.metrics.ops.labels(self.source.name, t.name).inc(
                sum(len(b.ops) for b in published)
            )

    # -- periodic work -----------------------------------------------------------------------

    def tick(self) -> None:
        """Fence poll: canaries, progress, stall detection, resync requests, anti-entropy."""
        now = self.clock()
        if self.sync.resync_interval > 0:
            if self._next_antientropy == 0.0:
                self._next_antientropy = now + self.sync.resync_interval
            elif now >= self._next_antientropy:
                self._next_antientropy = now + self.sync.resync_interval
                for t in self.targets:
                    t.owe(Cause.ANTI_ENTROPY)
        for t in self.targets:
            if t.need_resync:
                continue
            try:
                self._check_target(t, now)
            except RetryableError as exc:
                log.warning("%s→%s: fence poll failed: %s", self.source.name, t.name, exc)
            except Exception:
                # A target's records are input too: whatever they make fail, this target
                # is resynced (which rewrites them) and the others go on.
                log.exception("%s→%s: fence poll failed", self.source.name, t.name)
                self.metrics.errors.labels(self.source.name, "fence_poll").inc()
                t.owe(Cause.CORRUPT_RECORD, "the fence poll failed")
        if now >= self._next_drain:
            self._next_drain = now + self.sync.drain_check_interval
            configured = [c.name for c in self.settings.sources]
            # every configured target, not only this source's: a target that is no other
            # source's target (its own cluster) must be drained too
            for name, etcd in self._drain_targets().items():
                try:
                    drain_removed(etcd, name, configured, self.sync.drain_grace)
                except RetryableError as exc:
                    log.warning("%s: drain check failed: %s", name, exc)
                except Exception:
                    log.exception("%s: drain check failed", name)
                    self.metrics.errors.labels(self.source.name, "drain").inc()
        pending = [t for t in self.targets if t.need_resync and now >= t.resync_after]
        if pending and now >= self._resync_after:
            self.flush()  # what is buffered goes to the healthy targets first
            if self._queue_full(now):
                return  # a snapshot into a full queue would only fill it more
            try:
                self._resync(pending)
            except RetryableError as exc:
                log.warning("%s: resync failed: %s", self.source.name, exc)
            for t in pending:
                if not t.need_resync:
                    self._space_resyncs(t, now)
            if any(t.need_resync for t in pending):
                # failed resyncs back off: each opens a generation and lists the source
                self._resync_backoff = min(max(1.0, self._resync_backoff * 2), 60.0)
                self._resync_after = now + self._resync_backoff
                log.warning(
                    "%s: resync of %s not done; next try in %.0fs",
                    self.source.name,
                    ", ".join(t.name for t in pending if t.need_resync),
                    self._resync_backoff,
                )
            else:
                self._resync_backoff = 0.0

    def _space_resyncs(self, t: Target, now: float) -> None:
        """Resyncs of one target that follow each other closely come ever further apart
        (up to 5 min): whatever keeps causing them (a worker that keeps asking, records
        someone keeps breaking) must not turn into a listing of the source every second."""
        if now - t.last_resync_at < 60.0:
            t.resync_spacing = min(max(1.0, t.resync_spacing * 2), 300.0)
        else:
            t.resync_spacing = 0.0
        t.last_resync_at = now
        t.resync_after = now + t.resync_spacing

    def _drain_targets(self) -> dict[str, Etcd]:
        clients = {t.name: t.etcd for t in self.targets}
        for c in self.settings.targets:
            if c.name not in clients:
                if c.name not in self._extra_clients:
                    self._extra_clients[c.name] = Etcd(c, self.sync.etcd_timeout, WRITE)
                clients[c.name] = self._extra_clients[c.name]
        return clients

    def _check_target(self, t: Target, now: float) -> None:
        src = self.source.name
        records = {kv.key: kv for kv in t.etcd.scan(state_prefix(src))[1]}
        gen_kv = records.get(gen_key(src))
        if gen_kv is None:
            t.owe(Cause.TARGET_WIPED, "the target lost its kvmesh records")
            return
        try:
            gen = _plausible(GenRecord.decode(gen_kv.value)).gen
        except CorruptRecordError as exc:
            t.owe(Cause.CORRUPT_RECORD, f"generation record: {exc}")
            return
        if gen != t.gen:
            t.owe(Cause.GENERATION_MOVED, f"generation moved to {gen} under {t.gen}")
            return
        req = records.get(resync_key(src))
        if req is not None:
            t.etcd.txn(  # only the request we read: a newer one must survive
                [transactions.Mod(resync_key(src)) == req.mod_revision],
                [transactions.Delete(resync_key(src))],
            )
            asked = _request_gen(req.value, self.signer)
            if asked == t.gen:
                self.metrics.resync_requests.labels(src, t.name, "honoured").inc()
                t.owe(Cause.REQUESTED, "requested by a worker")
                return
            if asked is not None and asked < t.gen:
                # made for a generation that a resync already replaced
                self.metrics.resync_requests.labels(src, t.name, "stale").inc()
            else:
                # unreadable, or for a generation nobody opened: not from a worker of ours
                self.metrics.resync_requests.labels(src, t.name, "ignored").inc()
                log.warning(
                    "%s→%s: ignored a resync request for generation %s (current %d)",
                    src,
                    t.name,
                    asked if asked is not None else "?",
                    t.gen,
                )
        fences: dict[str, FenceRecord] = {}
        for shard in self.shards:
            kv = records.get(fence_key(src, shard))
            if kv is not None:
                try:
                    fences[shard] = _plausible(FenceRecord.decode(kv.value))
                except CorruptRecordError as exc:
                    t.owe(Cause.CORRUPT_RECORD, f"fence of {shard}: {exc}")
                    return
        stalled = []
        for shard in self.shards:
            f = fences.get(shard)
            pos = f.pos if f is not None and f.gen == t.gen else (0, 0)
            moved = pos != t.fence_pos.get(shard)
            t.fence_pos[shard] = pos
            if pos >= t.chain[shard]:
                t.behind_since.pop(shard, None)
                continue
            if moved or shard not in t.behind_since:
                t.behind_since[shard] = now
            elif now - t.behind_since[shard] > self.sync.stall_timeout:
                stalled.append(shard)
        # A lost batch shows as a shard that is behind what was published while its fence
        # stands still and nothing is left in the queue to deliver it. A slow backlog keeps
        # fences moving, and a stopped worker pool leaves the queue full: neither is a loss.
        # Each shard is judged alone: under churn the other shards keep moving.
        if stalled and self.publisher.backlog() == 0:
            self.metrics.stalls.labels(self.source.name, t.name).inc()
            t.owe(Cause.STALLED, f"shards {', '.join(stalled[:3])} stalled")
            return
        for res in RESOURCES:
            if res.canary is None or res.name in t.canaried:
                continue
            shards = [s for s in self.shards if shard_resource(s) == res.name]
            if all((f := fences.get(s)) is not None and f.gen == t.gen and f.done for s in shards):
                stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
                t.etcd.put(canary_key(self.source.name, res), stamp)
                t.canaried.add(res.name)
                log.info("%s→%s: %s synced (canary written)", self.source.name, t.name, res.name)
        all_canaried = all(r.name in t.canaried for r in RESOURCES if r.canary is not None)
        self.metrics.initial_sync.labels(self.source.name, t.name).set(int(all_canaried))
        through = self._applied_through(t, fences)
        # Write when something synced moved, or as a slow heartbeat: every write bumps the
        # target's revision, and in a full mesh that target is another watcher's source.
        due = t.progress_at == 0.0 or now - t.progress_at >= _PROGRESS_HEARTBEAT
        if through > t.progress_rev and (self._last_event_rev > t.progress_rev or due):
            self._write_progress(t, through, now)

    def _applied_through(self, t: Target, fences: dict[str, FenceRecord]) -> int:
        """The highest revision R such that every synced source event up to R has landed in
        the target (0 while a snapshot is still landing). It is also a safe resume point."""
        if not self.delivered:
            return 0
        through = min(self.delivered.values())
        for pending in (self.buffer.min_position(), t.outbox.min_position()):
            if pending is not None:
                through = min(through, pending[0] - 1)
        for shard in self.shards:
            f = fences.get(shard)
            if f is None or f.gen != t.gen or not f.done:
                return 0
            if f.pos < t.chain[shard]:
                # everything of this shard before the fence landed; what follows may not have
                through = min(through, f.pos[0] - 1)
        return max(through, t.snapshot_rev)

    def _write_progress(self, t: Target, through: int, now: float) -> None:
        value = json.dumps({"gen": t.gen, "rev": through, "ts": time.time()}).encode()
        ok, _ = t.etcd.txn(
            [transactions.Mod(gen_key(self.source.name)) == t.gen_rev],
            [transactions.Put(progress_key(self.source.name), value)],
        )
        if ok:
            t.progress_rev = through
            t.progress_at = now
            self.metrics.applied_revision.labels(self.source.name, t.name).set(through)

    # -- generations -------------------------------------------------------------------------

    def _open_generation(self, t: Target, *, allow_resume: bool, source_rev: int) -> int | None:
        """Bump the target's generation. If its fences allow, resume: returns the revision the
        watch must start from. Otherwise marks the target for a resync and returns None."""
        src = self.source.name
        records = {kv.key: kv for kv in t.etcd.scan(state_prefix(src))[1]}
        gen_kv = records.get(gen_key(src))
        old: GenRecord | None = None
        corrupt = ""
        if gen_kv is not None:
            try:
                old = _plausible(GenRecord.decode(gen_kv.value))
            except CorruptRecordError as exc:
                corrupt = f"generation record: {exc}"
        fences: dict[str, FenceRecord] = {}
        for shard in self.shards:
            kv = records.get(fence_key(src, shard))
            if kv is not None:
                try:
                    fences[shard] = _plausible(FenceRecord.decode(kv.value))
                except CorruptRecordError as exc:
                    corrupt = corrupt or f"fence of {shard}: {exc}"
        # Never reuse a generation, even when the target forgot its records (wiped): batches
        # of the forgotten generation may still be in flight. The clock gives a floor that
        # survives both a wiped target and a restarted watcher.
        new_gen = max(
            [old.gen + 1 if old else 1, t.gen + 1, int(time.time() * 1000)]
            + [f.gen + 1 for f in fences.values()]
        )
        record = GenRecord(new_gen, self.sync.shards, self.sync.identities, self.source_cluster_id)
        ok, written_rev = t.etcd.txn_revision(
            [transactions.Mod(gen_key(src)) == (gen_kv.mod_revision if gen_kv else 0)],
            [transactions.Put(gen_key(src), record.encode())],
        )
        if not ok:
            raise RetryableError(f"target {t.name}: generation record changed while opening one")
        t.etcd.delete(draining_key(src))  # back in the config: stop any drain of it
        t.gen, t.gen_rev = new_gen, written_rev
        t.outbox.drain()  # owed to the old generation: the new one starts from its fences
        t.unsent = []
        t.canaried = set()
        self.metrics.generation.labels(src, t.name).set(new_gen)
        pkv = records.get(progress_key(src))
        reason: Cause | None = None
        if not allow_resume:
            return None
        if corrupt:
            t.need_resync, t.resync_detail = Cause.CORRUPT_RECORD, corrupt
            return None
        if old is None:
            reason = Cause.NO_GENERATION
        elif (old.shards, old.identities) != (self.sync.shards, self.sync.identities):
            reason = Cause.SETTINGS_CHANGED
        elif old.source_cluster_id != self.source_cluster_id:
            reason = Cause.SOURCE_REPLACED
        elif len(fences) != len(self.shards) or any(
            f.gen != old.gen or not f.done for f in fences.values()
        ):
            reason = Cause.FENCES_INCOMPLETE
        elif max(f.pos[0] for f in fences.values()) > source_rev:
            reason = Cause.FENCES_AHEAD
        if reason is not None:
            t.need_resync, t.resync_detail = reason, ""
            return None
        assert old is not None
        through = _progress_rev(None if pkv is None else pkv.value, old.gen, source_rev)
        t.chain = {s: fences[s].pos for s in self.shards}
        t.skip = {s: max(fences[s].pos, (through, END)) for s in self.shards}
        self._write_fences(t, {s: FenceRecord(new_gen, fences[s].pos, True) for s in self.shards})
        t.need_resync = None
        t.snapshot_rev = 0
        t.progress_rev = through
        self._reset_stall(t)
        self.metrics.resumes.labels(src, t.name).inc()
        log.info("%s→%s: generation %d resumes from the fences", src, t.name, new_gen)
        return min(p[0] + 1 if p[1] == END else p[0] for p in t.skip.values())

    def _write_fences(self, t: Target, fences: dict[str, FenceRecord]) -> None:
        src = self.source.name
        items = list(fences.items())
        for i in range(0, len(items), 100):
            ok, _ = t.etcd.txn(
                [transactions.Mod(gen_key(src)) == t.gen_rev],
                [transactions.Put(fence_key(src, s), f.encode()) for s, f in items[i : i + 100]],
            )
            if not ok:
                raise RetryableError(f"target {t.name}: generation moved while writing fences")

    def _reset_stall(self, t: Target) -> None:
        t.fence_pos = {}
        t.behind_since = {}

    def _resync(self, targets: list[Target]) -> int:
        """Open a new generation in each target, list the source at one revision R, and
        publish, while listing, only what differs from each target. Returns R."""
        src = self.source.name
        rev = self.etcd.revision()
        cutters: list[tuple[Target, Cause, SnapshotCutter]] = []
        for t in targets:
            reason = t.need_resync or Cause.START
            try:
                self._open_generation(t, allow_resume=False, source_rev=rev)
                t.etcd.delete_prefix(rejected_prefix(src))  # this snapshot decides anew
                actual = read_target(t.etcd, src, page=self.sync.page_size)
                self._write_fences(t, {s: FenceRecord(t.gen, (rev, 0), False) for s in self.shards})
            except RetryableError as exc:
                log.warning("%s→%s: cannot start a resync: %s", src, t.name, exc)
                t.need_resync = reason
                continue
            t.need_resync = reason  # set until the whole snapshot is published
            t.chain = {s: (rev, 0) for s in self.shards}
            t.skip = {s: (rev, END) for s in self.shards}
            t.snapshot_rev = rev
            t.progress_rev, t.progress_at = 0, 0.0
            self._reset_stall(t)
            cutters.append(
                (
                    t,
                    reason,
                    SnapshotCutter(
                        source=src,
                        target=t.name,
                        gen=t.gen,
                        revision=rev,
                        actual=actual,
                        shard_of=lambda key: target_shard(src, key, self.sync.shards),
                        max_ops=self.sync.max_batch_ops,
                        max_bytes=self.sync.max_batch_bytes,
                    ),
                )
            )
        if not cutters:
            raise RetryableError("no target reachable for the resync")
        started = self.clock()
        outbox: dict[str, list[Batch]] = {t.name: [] for t, _, _ in cutters}
        failed: set[str] = set()

        def send(t: Target, batches: list[Batch], force: bool = False) -> None:
            box = outbox[t.name]
            box.extend(batches)
            if t.name in failed or not box or (len(box) < 32 and not force):
                return
            try:
                self.publisher.publish(box)
                self.metrics.batches.labels(src, t.name).inc(len(box))
                self.metrics.ops.labels(src, t.name).inc(sum(len(b.ops) for b in box))
            except RetryableError as exc:
                log.warning("%s→%s: publishing the snapshot failed: %s", src, t.name, exc)
                failed.add(t.name)
            box.clear()

        shards = self.sync.shards
        for listed, (res, key, value) in enumerate(
            iter_source(
                self.etcd,
                self.layout,
                rev,
                page=self.sync.page_size,
                max_bytes=self.sync.max_batch_bytes,
                on_reject=self._reject,
            )
        ):
            shard = shard_of(res, key, shards)
            for t, _, cutter in cutters:
                send(t, cutter.want(key, value, shard))
            if listed % 5000 == 4999 and not self._keep_lease():  # a long listing keeps the lease
                raise RetryableError("lost the lease during a resync")
        _, config = self.etcd.scan(RESOURCE_BY_NAME["config"].source_prefix(src), rev, exact=True)
        self._config_rev = next((kv.mod_revision for kv in config), 0)
        for t, reason, cutter in cutters:
            send(t, cutter.finish(), force=True)
            if t.name in failed:
                continue
            last = cutter.last_positions()
            try:  # shards the snapshot did not touch are complete already
                self._write_fences(
                    t, {s: FenceRecord(t.gen, (rev, 0), True) for s in self.shards if s not in last}
                )
            except RetryableError as exc:
                log.warning("%s→%s: resync failed: %s", src, t.name, exc)
                continue
            t.chain.update(last)
            t.need_resync = None
            self.metrics.resyncs.labels(src, t.name, reason.value).inc()
            for kind, n in (
                ("missing", cutter.missing),
                ("different", cutter.different),
                ("extra", cutter.extra),
            ):
                self.metrics.resync_keys.labels(src, t.name, kind).inc(n)
            log.info(
                "%s→%s: generation %d resynced at revision %d (%s%s): %d missing, "
                "%d different, %d extra, in %.2fs",
                src,
                t.name,
                t.gen,
                rev,
                reason.value,
                f": {t.resync_detail}" if t.resync_detail else "",
                cutter.missing,
                cutter.different,
                cutter.extra,
                self.clock() - started,
            )
        return rev

    # -- streams -----------------------------------------------------------------------------

    def _start_streams(self, start_rev: int) -> None:
        now = self.clock()
        self._next_progress = now + self.sync.fence_poll_interval / 2
        self._next_tick = now + self.sync.fence_poll_interval
        self._stop_streams()
        self.epoch += 1
        epoch = self.epoch
        self.delivered = {r.name: start_rev - 1 for r in RESOURCES}
        for res in RESOURCES:
            self._start_stream(res, start_rev, epoch)

    def _start_stream(self, res: Resource, start_rev: int, epoch: int) -> None:
        name = res.name

        def on_events(events: list[Event], header_rev: int) -> None:
            self.inbox.put(("events", epoch, name, events, header_rev))

        me: list[WatchStream] = []

        def on_error(exc: BaseException) -> None:
            self.inbox.put(("error", epoch, name, exc, me[0] if me else None))

        stream = self.etcd.watch(
            res.source_prefix(self.source.name, self.sync.identities),
            start_rev,
            on_events,
            on_error,
            exact=res.single_key,
        )
        me.append(stream)
        self.streams[name] = stream

    def _stop_streams(self) -> None:
        for stream in self.streams.values():
            stream.stop()
        self.streams = {}

    def _stream_failed(
        self, res_name: str, exc: BaseException, stream: WatchStream | None = None
    ) -> None:
        src = self.source.name
        if isinstance(exc, CompactedError):
            log.warning(
                "%s: watch of %s compacted (%s): resyncing every target", src, res_name, exc
            )
            self._restart_all(Cause.COMPACTED, str(exc))
            return
        self.metrics.source_failures.labels(src).inc()
        log.warning("%s: watch of %s failed: %s; reconnecting", src, res_name, exc)
        try:
            replaced = self._source_replaced()
        except RetryableError as err:
            self.metrics.source_failures.labels(src).inc()
            log.warning("%s: source unreachable: %s", src, err)
            self.stop_event.wait(1.0)
            self.inbox.put(("error", self.epoch, res_name, err, stream))
            return
        if replaced:
            log.warning(
                "%s: the source etcd lost its history (%s): resyncing every target", src, replaced
            )
            self._restart_all(Cause.SOURCE_REPLACED, replaced)
            return
        old = self.streams.pop(res_name, None)
        if old is not None:
            old.stop()
        # A fresh epoch for just this stream would drop the others' responses, so the
        # replacement keeps the epoch; the failed stream reports nothing more after its error.
        self._start_stream(RESOURCE_BY_NAME[res_name], self.delivered[res_name] + 1, self.epoch)

    def _source_replaced(self) -> str | None:
        """Why the source etcd is not the one we watched (restored or wiped), or None. An etcd
        started afresh with the same member names keeps its cluster ID, so its revision and
        the cluster config's revision are compared with what was already seen."""
        rev, cluster_id = self.etcd.header()
        if cluster_id != self.source_cluster_id:
            return "another cluster ID"
        seen = max(self.delivered.values(), default=0)
        if rev < seen:
            return f"revision {rev} is below {seen}, already seen"
        config = self.etcd.get(RESOURCE_BY_NAME["config"].source_prefix(self.source.name))
        if (
            config is not None
            and self._config_rev
            and config.mod_revision <= seen
            and config.mod_revision != self._config_rev
        ):
            return "the cluster config changed without an event"
        return None

    def _restart_all(self, reason: Cause, detail: str) -> None:
        self._stop_streams()
        self.epoch += 1
        self.buffer.drain()
        self._flush_deadline = None
        while not self.stop_event.is_set() and self._keep_lease():
            try:
                self.source_cluster_id = self.etcd.header()[1]
                for t in self.targets:
                    t.need_resync, t.resync_detail = reason, detail
                rev = self._resync(list(self.targets))
                self._start_streams(rev + 1)
                return
            except RetryableError as exc:
                log.warning("%s: resync after %s failed: %s", self.source.name, reason, exc)
                self.stop_event.wait(1.0)


_R = TypeVar("_R", GenRecord, FenceRecord)


def _plausible(record: _R) -> _R:
    """A record whose generation is more than a day ahead of the clock was not opened by a
    watcher (each is at least the time in ms, plus one per bump): taking it would make every
    new generation follow it, up to where the wire format ends."""
    if record.gen > int(time.time() * 1000) + 86_400_000:
        raise CorruptRecordError(f"generation {record.gen} is ahead of the clock")
    return record


def _progress_rev(raw: bytes | None, gen: int, source_rev: int) -> int:
    """The revision a progress record of generation *gen* vouches for, or 0 when there is
    none that can be believed (corrupt, of another generation, or past the source)."""
    if raw is None or len(raw) > 4096:
        return 0
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(record, dict) or record.get("gen") != gen:
        return 0
    rev = record.get("rev")
    if not isinstance(rev, int) or isinstance(rev, bool) or not 0 <= rev <= source_rev:
        return 0
    return rev


def _request_gen(raw: bytes, signer: Signer | None) -> int | None:
    """The generation a resync request names, or None if it is not a request a worker of
    this mesh wrote (workers sign their requests as watchers sign tasks)."""
    try:
        request = json.loads(raw) if len(raw) <= 4096 else None
        if not isinstance(request, dict):
            return None
        if signer is not None:
            signer.verify(request)
        gen = request["gen"]
    except (MalformedBatchError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and gen > 0 else None
