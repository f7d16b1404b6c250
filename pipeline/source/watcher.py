"""The watcher of one source cluster: the loop that joins its parts.

    feed.SourceFeed        the source's watches, as typed items (one etcd read connection)
    targets.TargetControl  its records in each target (one etcd write connection each)
    planner                what to do about a target: resume or resync, what a poll owes
    resync.run             list-and-diff, as a streaming merge
    drain                  sources that left the config, drained from every target

The watcher itself holds the term (a lease in Redis, renewed on a thread of its own), the
loop and its timers, and publishing: changes are filtered, rewritten, coalesced per shard
and cut into batches chained after each shard's last one, for every target under that
target's current generation. One thread (run()) owns all of its state.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pipeline.clients.etcd import Etcd, EtcdClient
from pipeline.clients.lease import AlwaysLeader, Lease
from pipeline.clients.publisher import MAX_OPS_PER_TASK, Publisher
from pipeline.config import READ, WRITE, ClusterConfig, Settings
from pipeline.protocol.batching import Change, ShardBuffer, make_batches
from pipeline.protocol.errors import (
    BadInputError,
    CompactedError,
    LeaseGoneError,
    PermissionDeniedError,
    PublishError,
    QueueFullError,
    RetryableError,
)
from pipeline.protocol.fence import FenceRecord, GenRecord, Position
from pipeline.protocol.layout import (
    MAX_CACHED_CLUSTER_CONFIG,
    RESOURCE_BY_NAME,
    RESOURCES,
    Op,
    Resource,
    canary_key,
    parse_cluster_config,
    parse_shard,
    source_caps,
)
from pipeline.protocol.logs import LineBudget
from pipeline.protocol.sharding import all_shards, shard_of, shard_resource
from pipeline.protocol.snapshot import SnapshotCutter, convert
from pipeline.protocol.wire import MAX_BATCHES_PER_TASK, Batch, Signer
from pipeline.source import resync
from pipeline.source.drain import drain_removed
from pipeline.source.feed import INBOX, INBOX_BYTES, Delivered, Lost, SourceFeed
from pipeline.source.listing import Readiness, read_readiness
from pipeline.source.metrics import WatcherMetrics
from pipeline.source.planner import (
    END,
    UNKNOWN,
    UNVOUCHED,
    Cause,
    Listing,
    PairState,
    Resume,
    Resync,
    SourceFacts,
    TargetRecords,
    Vouch,
    applied_through,
    assess,
    complete,
    new_generation,
    plan_start,
    progress_vouch,
    progress_writes,
    unrecorded,
)
from pipeline.source.targets import TargetControl

log = logging.getLogger("kvmesh.watcher")


class _NoTargetReachable(RetryableError):
    """A resync found none of its targets reachable: each still owes it."""


_FLUSH_AT = 8192  # pending changes that force a flush before the linger ends
# ... or bytes of their keys and values: a task of large values is encoded several times
# over (base64, JSON, the command to Redis) before it is sent, so a flush holds a few
# megabytes of them, not thousands
_FLUSH_BYTES = 8 << 20
_PROGRESS_HEARTBEAT = 30.0  # seconds between progress writes when nothing synced changed
_TAKE = 512  # feed items taken per pass of the loop, at most
# Bad input is logged a line per key up to this many lines a minute for each reason; the
# rest is said in one line a minute (every key is counted in kvmesh_watcher_rejected_total)
_REJECT_LINES = 100
_TAKE_BYTES = _FLUSH_BYTES  # ... and their events' bytes (events_bytes): a flush's worth
_MAX_MARKS = 256  # flush marks kept per target while their batches are in flight
# The linger stays sync.linger while at most _KEEPING_UP tasks wait in the source queue (a
# pool's slots take the next ones at once), and grows by _PER_TASK for each task beyond,
# up to sync.max_linger: a backlog turns into larger tasks gradually, and a short burst of
# queued tasks costs a few milliseconds, not a jump to the longest linger.
_KEEPING_UP = 2
_PER_TASK = 0.005
_DEPTH_EVERY = 0.1  # seconds between two reads of the queue depth
# With sync.idle_flush, a flush is spaced by the linger only if the queue held a task this
# recently: a sample this fresh decides (one round trip to Redis). While a flush lingers
# and at most _KEEPING_UP tasks wait, the queue is looked at this often, to publish as
# soon as it empties; with more waiting, only when the linger ends.
_IDLE_LOOK = 0.002
# The source's rate of changes, for sync.idle_flush_max_rate, is a moving average over
# about this many seconds (an exponentially decaying count)
_RATE_WINDOW = 0.1
_LOOK_DURING_RESYNC = 0.1  # seconds between looks for complete resources while listing
# A target whose fence poll fails is polled again after 1 s, then twice as long each time up
# to this
_POLL_BACKOFF_MAX = 30.0
# The fence poll waits this long at most for the reads of targets that answered their last
# one; a read still under way then (a target that drops packets makes it last
# sync.etcd_timeout), or one of a target whose last read failed, is taken up by a later poll
_POLL_WAIT = 0.25
# A term's start reads every target side by side and waits for the others, once one has
# answered, this long or four times that answer's wait, whichever is longer: a target that
# drops packets is left to the fence poll (its read under way) instead of holding up the
# start of every other pair for sync.etcd_timeout
_START_GRACE = 1.0

EtcdFactory = Callable[[ClusterConfig, float, str], EtcdClient]


_R = TypeVar("_R")


def _call(fn: Callable[[], _R]) -> _R | Exception:
    """fn(), or the exception it raised: a poller thread hands either back to the loop."""
    try:
        return fn()
    except Exception as exc:
        return exc


def _write_then_read(
    write: Callable[[], bool], written: list[bool], read: Callable[[], TargetRecords]
) -> TargetRecords:
    """A fence poll's read that first writes the progress record the poll before decided
    on, noting in *written* whether its compare held."""
    written.append(write())
    return read()


@dataclass
class Target:
    """What the watcher knows about one target of its source."""

    control: TargetControl
    pair: PairState = field(default_factory=lambda: PairState(gen=0, chain={}))
    gen_rev: int = 0
    skip: dict[str, Position] = field(default_factory=dict)  # events at/below are covered
    need_resync: Cause | None = Cause.START  # set while a resync is owed
    held_marked: bool = False  # the target records that deletes were held (see _hold)
    resync_detail: str = ""  # what the log says about the cause
    snapshot_rev: int = 0
    progress_rev: int = 0
    progress_at: float = 0.0  # when the progress record was last written
    # a progress record a poll decided on, written on a poller thread just before the
    # target's next read (Watcher._read_records), never on the loop: (write, through, when)
    progress_due: tuple[Callable[[], bool], int, float] | None = None
    # ... and the one that read carries: (through, when, [whether it was written])
    progress_sent: tuple[int, float, list[bool]] | None = None
    # changes owed to this target and not cut into batches yet (its queue is full, or the
    # broker failing); coalesced per key, which keeps a delete for every key touched: bounded
    # by sync.max_held_changes and sync.max_held_bytes while publishing is paused
    # (Watcher._bound_paused)
    outbox: ShardBuffer = field(default_factory=ShardBuffer)
    # batches cut and chained but not known to be published: sent again as they are, so a
    # publish that did land after all is only a duplicate
    unsent: list[Batch] = field(default_factory=list)
    last_resync_at: float = -1e9
    resync_spacing: float = 0.0
    resync_after: float = 0.0  # resyncs of this target wait until then (see _space_resyncs)
    # (generation, D, chain) per flush that cut this target's batches: once every shard's
    # fence reaches that chain, every synced event up to revision D has landed
    marks: deque[tuple[int, int, dict[str, Position]]] = field(default_factory=deque)
    mark_through: tuple[int, int] = (0, 0)  # (generation, D) of the newest landed mark
    poll_after: float = 0.0  # its fence poll waits until then after a failed one
    poll_backoff: float = 0.0  # seconds it waited after the last poll, 0 after one that worked
    # the read of its records under way, and the generation it began under (a read that
    # comes back after a new generation opened says nothing of it)
    reading: Future[TargetRecords | Exception] | None = None
    reading_gen: int = 0
    # whether that read began while the target was owed a resync (then it tells whether the
    # target answers: Watcher._read_records), and when it began
    reading_probe: bool = False
    reading_at: float = 0.0

    @property
    def name(self) -> str:
        return self.control.name

    @property
    def silent(self) -> bool:
        """Whether its last read failed or is still under way: a call to it on the loop
        could wait sync.etcd_timeout (it may be dropping packets)."""
        return bool(self.poll_backoff) or self.reading is not None

    def held(self) -> tuple[int, int]:
        """The changes held for this target and not published (its outbox, and batches cut
        but not published), and the bytes of their keys and values (op_size)."""
        return (
            len(self.outbox) + sum(len(b.ops) for b in self.unsent),
            self.outbox.bytes + sum(b.size for b in self.unsent),
        )

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
        etcd: EtcdFactory = Etcd,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        inbox: int = INBOX,
        inbox_bytes: int = INBOX_BYTES,
        *,
        watched: Callable[[str], bool | None],
    ) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.source = source
        self.layout = settings.layout_of(source)
        self.publisher = publisher
        self.signer = signer  # verifies the workers' resync requests (None: insecure mode)
        self.metrics = metrics or WatcherMetrics()
        self.clock = clock
        self._reject_lines = LineBudget(_REJECT_LINES, 60.0, clock)
        self.wall_ms = wall_ms
        self.shards = all_shards(settings.sync.shards)
        # a flush lays each target's shards out in this order (by resource, then number)
        self._shard_rank = {s: i for i, s in enumerate(self.shards)}
        self._etcd = etcd
        src = source.name
        self.feed = SourceFeed(
            etcd(source, settings.sync.etcd_timeout, READ),  # never writes to its source
            src,
            settings.sync.identities,
            settings.sync.watch_timeout,
            on_failure=self._source_failed,
            inbox=inbox,
            clock=clock,
            inbox_bytes=inbox_bytes,
        )
        self.targets = [
            Target(
                TargetControl(
                    c,
                    etcd(c, settings.sync.etcd_timeout, WRITE),
                    src,
                    self.shards,
                    signer,
                    settings.sync.page_size,
                    settings.sync.cache_lease_ttl,
                )
            )
            for c in settings.targets_of(src)
        ]
        self.buffer = ShardBuffer()
        self.stop_event = threading.Event()
        self._flush_deadline: float | None = None
        self._last_flush = -1e9  # when the last flush published something
        self._held_since: float | None = None  # when a due flush began to wait for a worker
        self._asked: set[str] = set()  # the shards the last look at the queue asked about
        self.synced_once: set[str] = set()  # targets that had their initial sync
        self._next_tick = 0.0
        self._next_progress = 0.0
        self._next_antientropy = 0.0
        self._next_drain = 0.0
        self._publish_after = 0.0  # publishing paused until then (broker full or failing)
        # how a snapshot waits for room in the queue: True once the watcher stops (a test
        # lets its workers run instead)
        self._room_wait: Callable[[float], bool] = self.stop_event.wait
        self._room_logged = -math.inf  # when a snapshot last said it waits for room
        # the source's recent changes a second (_arrival_rate), as of _rate_at
        self._rate = 0.0
        self._rate_at = 0.0
        self._publish_backoff = 0.0
        self._queue_sample = (0.0, 0)  # (when, depth) of the last look at the queue
        self._resync_after = 0.0  # failed resyncs back off until then
        self._resync_backoff = 0.0
        self._drain_clients: dict[str, EtcdClient] = {}
        # the threads that read the targets' records for the fence poll (made as reads
        # come): a read waits on the network, and keeps its thread for sync.etcd_timeout at
        # most. One read per target is tracked (Target.reading); a term's start may begin
        # another while one of the term before is still under way (_probe_targets), hence
        # two threads per target. A pool of this watcher's own: targets that drop packets
        # in another source's pairs do not slow these reads
        self._pollers = ThreadPoolExecutor(2 * len(self.targets) or 1, f"poll:{src}")
        # whether a watcher may be syncing a source (clients.lease.lease_held): the drain
        # leaves such a source alone; and the sources whose wait was logged
        self._watched = watched
        self._refused = False  # the source's cluster config is refused (_config_refused)
        self._drain_waits_said: set[str] = set()
        self.readiness: Readiness | None = None  # what the source advertised, last read
        self.lease: Lease = lease or AlwaysLeader()
        self._standby_logged = False
        self._unreachable_logged = -1e9
        # The lease is renewed on a thread of its own, so that one slow etcd call of the main
        # loop (up to sync.etcd_timeout; a partitioned target makes several in a row) does
        # not cost the lease. The main loop beats a heart; a loop that has not beaten for
        # _stuck_after seconds is hung, and then the lease is released.
        self._in_term = threading.Event()
        self._lease_lost = threading.Event()
        self._beat = 0.0
        self._failures = 0
        self._term_started = 0.0
        self._opened = False  # the term's start() is done: its end records progress
        self._synced_term: set[str] = set()  # targets synced in this term (bootstrap_seconds)
        self._stuck_after = 3 * settings.sync.etcd_timeout + settings.sync.leader_ttl
        self._zero_series()

    def _zero_series(self) -> None:
        """Export the counters alerts watch at 0 from the start: a series that first appears
        at 3 has no increase() in Prometheus, and its first burst would go unseen."""
        m, src = self.metrics, self.source.name
        m.source_failures.labels(src)
        m.held_deletes.labels(src)
        for reason in ("layout", "too_large"):
            m.rejected.labels(src, reason)
        for reason in ("queue_full", "broker_error"):
            m.publish_paused.labels(src, reason)
        for where in ("fence_poll", "drain"):
            m.errors.labels(src, where)
        for t in self.targets:
            m.stalls.labels(src, t.name)

    @property
    def name(self) -> str:
        return self.source.name

    # -- the term ----------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()
        self.feed.wake()

    def unready(self) -> str | None:
        """Why this watcher is not ready, or None: a standby is ready (it runs and would
        take over) unless it cannot reach the broker, an active watcher once every target
        had its initial sync in this process (a later resync does not make it unready)."""
        if not self._in_term.is_set():
            problem = self.lease.unreachable()
            return None if problem is None else f"{self.source.name}: {problem}"
        pending = [t.name for t in self.targets if t.name not in self.synced_once]
        if pending:
            return f"{self.source.name}: initial sync not done in {', '.join(pending)}"
        return None

    def close(self) -> None:
        self.feed.stop()
        self.feed.etcd.close()
        for t in self.targets:
            t.control.close()
        for client in self._drain_clients.values():
            client.close()
        self._pollers.shutdown(wait=False)

    def run(self) -> None:
        """Run until stop() is called: wait as a standby until this watcher holds the
        source's lease, then sync; step down when the lease cannot be renewed."""
        src = self.source.name
        keeper = threading.Thread(target=self._renew_loop, name=f"lease:{src}", daemon=True)
        keeper.start()
        threading.Thread(target=self._keep_leases, name=f"leases:{src}", daemon=True).start()
        try:
            while not self.stop_event.is_set():
                if not self.lease.acquire():
                    self.metrics.active.labels(src).set(0)
                    problem = self.lease.unreachable()
                    if problem is not None:
                        # every 30 s while it lasts: a wrong or down broker must not look
                        # like a healthy standby
                        now = self.clock()
                        if now - self._unreachable_logged >= 30.0:
                            log.warning("%s: %s; retrying", src, problem)
                            self._unreachable_logged = now
                        self._standby_logged = False
                    elif not self._standby_logged:
                        log.info("%s: standby; %s is active", src, self.lease.holder() or "nobody")
                        self._standby_logged = True
                        self._unreachable_logged = -1e9
                    self.stop_event.wait(min(1.0, self.sync.leader_ttl / 4))
                    continue
                self._standby_logged = False
                log.info("%s: active (lease %s)", src, self.lease.owner)
                self.metrics.active.labels(src).set(1)
                self._term_started = self.clock()
                self._synced_term = set()
                self._beat = self.clock()
                self._lease_lost.clear()
                self._in_term.set()
                self._opened = False
                try:
                    self._serve()
                finally:
                    self._in_term.clear()
                    self._record_on_exit()
                    self._stepped_down()
                self.metrics.active.labels(src).set(0)
        finally:
            self.metrics.active.labels(src).set(0)
            keeper.join(timeout=self.sync.leader_ttl)
            self.lease.release()
            self.close()

    def _record_on_exit(self) -> None:
        """A term that ends (stopped, or stepping down) records the newest event it took in
        every target in step with its feed (not owed a resync) that answers, whatever the
        tick last recorded: batches it published land after it stops, and a new term
        resumes past them only if a record vouches for them (_vouch). The calls run side by
        side, each after the target's read under way if that read writes an older record
        first, for two sync.etcd_timeout at most; a target that does not answer is
        resynced by the next term instead. Never raises."""
        # as far as the last poll found each target, written or not yet; what is still
        # pending is this term's, and is dropped (a later term decides its own)
        found: dict[str, int] = {}
        # a read under way that writes a record first: the exit record must land after it
        writing: dict[str, Future[TargetRecords | Exception] | None] = {}
        for t in self.targets:
            found[t.name] = t.progress_rev
            if t.progress_due is not None:
                found[t.name] = max(found[t.name], t.progress_due[1])
            writing[t.name] = None
            if t.progress_sent is not None:
                found[t.name] = max(found[t.name], t.progress_sent[0])
                writing[t.name] = t.reading
            t.progress_due = t.progress_sent = None
        if not self._opened:
            return
        self._opened = False
        last, kept = self.feed.newest, self.feed.kept_writes()
        listing = self.feed.open_listing()
        src = self.source.name

        def record(
            t: Target,
            gen_rev: int,
            gen: int,
            through: int,
            base: int,
            before: Future[TargetRecords | Exception] | None,
        ) -> None:
            try:
                if before is not None:  # an older record, on its way: this one goes after it
                    wait([before], timeout=self.sync.etcd_timeout)
                t.control.write_progress(gen_rev, gen, through, kept, last, base, listing)
            except Exception as exc:  # anything: the term ends either way
                log.warning(
                    "%s→%s: recording progress as the term ends failed: %s", src, t.name, exc
                )

        due: list[Future[None]] = []
        try:
            for t in self.targets:
                # one whose fence read is merely slow is written too (the writes wait side
                # by side); one whose last read failed is left to the next term's resync
                if t.gen_rev and t.need_resync is None and not t.poll_backoff:
                    base = self._record_base(t)
                    args = (t, t.gen_rev, t.pair.gen, found[t.name], base, writing[t.name])
                    due.append(self._pollers.submit(record, *args))
            wait(due, timeout=2 * self.sync.etcd_timeout + 1.0)
        except Exception as exc:  # a pool shut down: nothing recorded, the next term resyncs
            log.warning("%s: recording progress as the term ends failed: %s", src, exc)
        for f in due:
            f.cancel()  # one still waiting for a thread must not write in a later term

    def _record_base(self, t: Target) -> int:
        """The revision *t*'s progress record says its history is vouched for up to, with no
        event taken past it: where the feed's watch began, or the listing *t* was resynced
        at, if later (the record's listing, the newest, is read back for it)."""
        return max(self.feed.base(), t.snapshot_rev)

    def _source_failed(self) -> None:
        """Count a failed call to the source, or a watch stream that broke or went silent."""
        src = self.source.name
        self._failures += 1
        self.metrics.source_failures.labels(src).inc()
        self.metrics.failures.labels(src).set(self._failures)
        self.metrics.last_failure.labels(src).set(time.time())

    def _stepped_down(self) -> None:
        """A standby is ready for nothing: its readiness gauges fall to 0, and it says
        nothing of its source's cluster config (the active watcher does)."""
        src = self.source.name
        self._config_refused(False)
        for t in self.targets:
            self.metrics.readiness.labels(src, t.name).set(0)
        for res in RESOURCES:
            for action in ("read", "write"):
                self.metrics.scope_synced.labels(res.scope, src, action).set(0)
            self.metrics.sync_queue.labels(res.scope, src).set(0)
        self.metrics.queue_depth.labels(src).set(0)  # another watcher reads it now
        self.metrics.queue_bytes.labels(src).set(0)
        for t in self.targets:
            self.metrics.cache_leases.labels(src, t.name).set(0)  # the active watcher's

    def _renew_loop(self) -> None:
        """Renew the lease every third of its TTL while a term runs and the main loop is
        not hung; otherwise tell the main loop to step down. A hung loop's lease is
        released first, for a standby to take over at once."""
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
                # released before the loop is told: a loop that moves again meanwhile steps
                # down and campaigns only after this, so the release cannot take the lease
                # of its next term
                try:
                    self.lease.release()
                except Exception as exc:  # anything: this thread must not end
                    log.error(
                        "%s: releasing the lease failed: %s: %s",
                        self.source.name,
                        type(exc).__name__,
                        exc,
                    )
            try:
                renewed = not hung and self.lease.renew()
            except Exception as exc:  # anything: this thread must not end while a term runs
                log.error(
                    "%s: renewing the lease failed: %s: %s; letting it go",
                    self.source.name,
                    type(exc).__name__,
                    exc,
                )
                renewed = False
            if not renewed:
                self._in_term.clear()
                self._lease_lost.set()

    def _keep_leases(self) -> None:
        """Keep the leases of the cached keys alive (sync.cache_lease_ttl), on a thread of
        its own, while this watcher is active: whatever the main loop is doing (a long
        resync, a start that keeps failing on the source), the caches do not expire."""
        every = self.sync.cache_lease_ttl / 3 if self.sync.cache_lease_ttl else 10.0
        while not self.stop_event.wait(every):
            if not self._in_term.is_set():
                continue
            self.keep_leases_once()

    def keep_leases_once(self) -> None:
        for t in self.targets:
            leases = t.control.leases
            for step in (leases.ensure_loaded, leases.keep_alive):  # the known ones either way
                try:
                    step()
                except RetryableError as exc:
                    log.warning(
                        "%s→%s: keeping leases alive failed: %s", self.source.name, t.name, exc
                    )
                except Exception:  # input (records) must not kill the thread
                    log.exception("%s→%s: keeping leases alive failed", self.source.name, t.name)

    def _serve(self) -> None:
        """One term as the active watcher. Its calls to the targets wait
        sync.loop_etcd_timeout at most: one to a target that went silent holds up every
        other pair until it fails (the reads of the fence poll, and those that decide
        whether a target owed a resync answers, go on poller threads, which wait
        sync.etcd_timeout)."""
        with contextlib.ExitStack() as patient:
            for t in self.targets:
                patient.enter_context(t.control.etcd.patience(self.sync.loop_etcd_timeout))
            self._serve_term()

    def _serve_term(self) -> None:
        backoff = 0.2
        while not self.stop_event.is_set():
            if not self._keep_lease():
                return
            try:
                self.start()
                break
            except RetryableError as exc:
                if exc.cluster == self.source.name:
                    self._source_failed()
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
        self._record_on_exit()
        self.feed.stop()
        self.buffer.drain()
        self._flush_deadline = self._held_since = None
        for t in self.targets:
            t.need_resync, t.resync_detail = Cause.START, ""
        return False

    def start(self) -> None:
        """Open a generation in every target, resuming from fences where possible, then
        start the watches."""
        for t in self.targets:
            t.control.leases.reset()  # read again: another watcher's term may have come between
        rev, self.feed.cluster_id = self.feed.etcd.header()
        self._resync_after = self._resync_backoff = 0.0  # a new term: no backoff owed yet
        # the cluster config as this etcd holds it now: a config revision kept from an
        # earlier term may be a write of an etcd replaced since, and the feed would then take
        # this one for another at its first reconnect
        self.feed.config_rev = self._read_readiness(rev).config_rev
        self.feed.listed = {}  # only what this term's resyncs list
        self.feed.listing = None
        self.feed.forget_looks()  # a listing read back once serves every target's record
        read_back: list[tuple[bytes, int]] = []  # writes of this etcd that targets recorded
        # per resumed target, what its record vouched for, read back (see _open)
        witnessed: list[Vouch] = []
        starts: list[int] = []
        answered = self._probe_targets()
        for t in self.targets:
            if t.name not in answered:
                continue
            try:
                leases = t.control.leases
                # kept alive from now on (Watcher._keep_leases); a load the keepalive
                # thread began is waited for as long as a call of the loop
                leases.ensure_loaded(wait=self.sync.loop_etcd_timeout)
                intact = not leases.lost.is_set()
                if not intact:  # one the keepalive thread finds from now on stays for tick
                    leases.lost.clear()
                    t.need_resync = Cause.LEASE_EXPIRED
                start = self._open(
                    t,
                    allow_resume=intact,
                    source_rev=rev,
                    records=answered[t.name],
                    read_back=read_back,
                    witnessed=witnessed,
                )
            except RetryableError as exc:
                if exc.cluster == self.source.name:
                    raise  # the source failed, not the target: the start is retried (_serve)
                self._unavailable(t, str(exc))
                continue
            if start is not None:
                starts.append(start)
        # one that failed is not called again here (each call to a target that drops
        # packets waits sync.etcd_timeout): it keeps its resync, which a tick begins once
        # a read of it comes back, while the watcher serves the others
        pending = [t for t in self.targets if t.need_resync and not t.silent]
        if pending:
            # none reachable: each still owes its resync, which the ticks retry once it
            # answers
            with contextlib.suppress(_NoTargetReachable):
                starts.append(self._resync(pending) + 1)
        if not starts:  # no target reachable yet: watch from now; they will be resynced
            starts.append(rev + 1)
        now = self.clock()
        self._next_progress = now + self.sync.fence_poll_interval / 2
        self._next_tick = now + self.sync.fence_poll_interval
        self.feed.start(min(starts))
        self.feed.remember(read_back)
        # what the next records vouch for until this term takes an event: the history of
        # the source up to there was vouched for, whatever revision the watch began at
        lasts = [v.last for v in witnessed if v.last is not None]
        if lasts:
            self.feed.newest = max(lasts, key=lambda w: w.revision)
        self.feed.started_at = max([self.feed.started_at] + [v.base for v in witnessed])
        # and a listing the term before began with, read back, while no event vouches for it
        listings = [v.listing for v in witnessed if v.listing is not None]
        if self.feed.listing is None and listings:
            self.feed.listing = max(listings, key=lambda x: x.revision)
        self._opened = True

    def _probe_targets(self) -> dict[str, TargetRecords | None]:
        """The targets that answer a read of their records at a term's start, by name, with
        what the read found (None: it raised, and _open reads again to raise it there).
        The reads go side by side on the poller threads; once one has come back, the
        others get _START_GRACE more, or four times as long as it took, whichever is
        longer. A target whose read failed or is still under way then is owed a resync
        (TARGET_UNAVAILABLE) and called no more on the loop: the fence poll takes its read
        up once it is over (a probe: one that came back lets the resync go,
        _read_records), and the start serves the others meanwhile, where a call of its own
        would have waited sync.etcd_timeout for each such target. A read still under way
        from an earlier try of this term's start is waited for again, not begun anew (a
        start retried while a target stays silent would otherwise pile reads up on the
        pollers); one from the term before says nothing of this one, is replaced, and
        ends on its own."""
        began, t0 = self.clock(), time.monotonic()
        reads: dict[Future[TargetRecords | Exception], Target] = {}
        for t in self.targets:
            mine = t.reading is not None and t.reading_probe
            if not (mine and t.reading_at >= self._term_started):
                t.progress_sent = None  # what the replaced read carried is not this one's
                t.reading = self._pollers.submit(_call, t.control.read)
                t.reading_gen, t.reading_probe, t.reading_at = t.pair.gen, True, began
            assert t.reading is not None
            reads[t.reading] = t
        answered: dict[str, TargetRecords | None] = {}
        under_way = set(reads)
        until = t0 + self.sync.etcd_timeout
        while under_way:
            done, under_way = wait(
                under_way, timeout=max(0.0, until - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                break
            first = not answered
            for read in done:
                t = reads[read]
                t.reading = None
                result = read.result()
                if isinstance(result, RetryableError):
                    self._unavailable(t, str(result))
                else:
                    answered[t.name] = None if isinstance(result, Exception) else result
            if first and answered:  # the first answer sets how long the others may take
                now = time.monotonic()
                until = min(until, now + max(_START_GRACE, 4 * (now - t0)))
        for read in under_way:
            self._unavailable(reads[read], "its records were not read in time")
        return answered

    def _unavailable(self, t: Target, why: str) -> None:
        """A target that did not answer at a term's start: owed a resync, which a tick
        begins once a read of it comes back, while the watcher serves the others."""
        log.warning("%s→%s: target unavailable: %s", self.source.name, t.name, why)
        t.owe(Cause.TARGET_UNAVAILABLE, why)
        # silent: its first read is due at the first tick, whatever an earlier term
        # spaced, and the next failure spaces the reads as a failed poll does
        t.resync_after = t.poll_after = 0.0
        t.poll_backoff = 1.0

    # -- the loop ----------------------------------------------------------------------------

    def step(self, max_wait: float | None = None) -> None:
        """One pass of the loop: take what the feed delivered, flush when due, tick. It
        waits for the feed until the next timer is due, or *max_wait* seconds at most."""
        now = self.clock()
        wait = max(0.0, min(self._next_tick, self._next_progress) - now)
        if self._flush_deadline is not None:
            wait = min(wait, max(0.0, self._flush_deadline - now))
            if self._may_go_early(now):
                wait = min(wait, _IDLE_LOOK)  # look again whether the workers caught up
        if max_wait is not None:
            wait = min(wait, max_wait)
        for item in self.feed.next(wait, _TAKE, _TAKE_BYTES):
            if isinstance(item, Lost):
                self._restart_all(item.cause, item.detail)
                return
            self.ingest(item)
        now = self.clock()
        if self._flush_deadline is not None:
            full = len(self.buffer) >= _FLUSH_AT or self.buffer.bytes >= _FLUSH_BYTES
            if full or (
                (
                    now >= self._flush_deadline
                    or (self._may_go_early(now) and self._depth(now, _IDLE_LOOK) == 0)
                )
                and not self._held_by_workers(now)
            ):
                self.flush()
        if now >= self._next_progress:
            # Half a poll before each tick, so the tick sees fresh watch progress.
            self._next_progress = now + self.sync.fence_poll_interval
            for lost in self.feed.check_silence():
                self._restart_all(lost.cause, lost.detail)
                return
        if now >= self._next_tick:
            self._next_tick = now + self.sync.fence_poll_interval
            self.tick()

    def ingest(self, item: Delivered) -> None:
        """Filter, rewrite and buffer one watch response."""
        resource, src = item.resource, self.source.name
        if item.events:
            self.metrics.events.labels(src, resource.name).inc(len(item.events))
            waited = max(0.0, time.monotonic() - item.received)
            deletes = sum(1 for ev in item.events if ev.value is None)
            for action, n in (("delete", deletes), ("update", len(item.events) - deletes)):
                if n:
                    child = self.metrics.events_queue.labels(resource.scope, action)
                    for _ in range(n):
                        child.observe(waited)
        if self.readiness is not None and not self.readiness.caps.syncs(resource):
            return  # the source does not advertise it: its cache is drained, not synced
        if item.events:
            # the source's pace, for the idle flush: every event, those that end up held
            # or rejected too (which only leans towards lingering)
            now = self.clock()
            self._rate = self._arrival_rate(now) + len(item.events) / _RATE_WINDOW
            self._rate_at = now
        waiting = self.waiting
        hold = resource.name in waiting or (resource.single_key and bool(waiting))
        for ev in item.events:
            if ev.value is None and hold:
                # deleted while the source is still being rebuilt: the resync that follows
                # its canary deletes what is still gone then
                self._hold()
                continue
            if resource.single_key:
                if ev.value is not None:
                    self._config_changed(ev.key, ev.value)
                else:
                    self._config_refused(False)  # none at all is no refused one
            try:
                tkey, tvalue = convert(
                    self.layout, resource, ev.key, ev.value, self.sync.max_batch_bytes
                )
            except BadInputError as exc:
                self._reject(exc)
                if ev.value is None:
                    continue
                # A key that became bad input must not leave its old value cached (unless its
                # resource waits for its source canary: then nothing is deleted).
                if hold:
                    self._hold()
                    continue
                try:
                    tkey = self.layout.rewrite(resource, ev.key)
                except BadInputError:
                    continue
                tvalue = None
            op = Op.PUT if tvalue is not None else Op.DELETE
            shard = shard_of(resource, tkey, self.sync.shards)
            self.buffer.add(
                shard, Change(tkey, op, tvalue, (ev.revision, ev.index)), item.received_ms
            )
        if len(self.buffer) and self._flush_deadline is None:
            # The linger spaces flushes: the first change after a quiet spell goes out at
            # once, and changes that follow a flush closely wait for the next one.
            now = self.clock()
            self._flush_deadline = max(now, self._last_flush + self._linger())
        self.metrics.source_revision.labels(src).set(max(self.feed.delivered.values()))

    def _config_changed(self, key: bytes, value: bytes) -> None:
        """A new cluster config that changes what is synced (serviceexports, services, synced
        canaries) owes every target a resync, which adds or drains what changed."""
        try:
            cfg = parse_cluster_config(
                key, value, self.layout.cluster_id, self.layout.max_connected_clusters
            )
        except BadInputError:
            self._config_refused(True)
            return  # rejected where it is converted
        self._config_refused(False)
        before = self.readiness
        if before is None or source_caps(cfg) == before.caps:
            return
        try:
            self._read_readiness(None)
        except RetryableError as exc:
            # a source slow or gone while its config changes must not end the watcher (and
            # with it every other source's): what changed is read again by the resync owed
            if exc.cluster == self.source.name:
                self._source_failed()
            log.warning(
                "%s: reading what its new cluster config advertises failed: %s; resyncing",
                self.source.name,
                exc,
            )
            for t in self.targets:
                t.owe(Cause.SOURCE_CONFIG)

    # -- what the source advertises ----------------------------------------------------------

    def _config_refused(self, refused: bool, reason: str = "") -> None:
        """Whether the source's cluster config is one kvmesh refuses: an operator must learn
        that no target gets it, which more often than not means the mesh config names the
        wrong cluster ID. A refusal found as the config changes is logged and counted as a
        rejected key where it is converted; one found by a read of what the source
        advertises (a term's start, which may resume and convert nothing) is logged here,
        once until the config is taken again."""
        if refused and reason and not self._refused:
            log.warning(
                "%s: cluster config refused, no target gets it: %s", self.source.name, reason
            )
        self._refused = refused
        self.metrics.config_refused.labels(self.source.name).set(int(refused))

    @property
    def waiting(self) -> frozenset[str]:
        """Resources waiting for their source canary."""
        return self.readiness.waiting() if self.readiness is not None else frozenset()

    def _read_readiness(self, rev: int | None) -> Readiness:
        """Read what the source advertises and which of its canaries exist. A resource whose
        canary appeared, or capabilities that changed, owe every target a resync (a target
        being resynced right now is covered by that resync)."""
        before = self.readiness
        raw = read_readiness(self.feed.etcd, self.layout, rev)
        self._config_refused(bool(raw.refused), raw.refused)
        if before is None and not raw.config:
            before = self._cached_readiness()
        ready = raw.carried(before)
        self.readiness = ready
        was = before.waiting() if before is not None else frozenset()
        waiting = ready.waiting()
        for res in RESOURCES:
            if res.canary is not None:
                self.metrics.waiting_source_canary.labels(self.source.name, res.name).set(
                    int(res.name in waiting)
                )
        if waiting - was:
            log.info(
                "%s: waiting for source canary of %s: nothing of these is deleted from the "
                "caches, nor their canary written, until the source writes it",
                self.source.name,
                ", ".join(sorted(waiting)),
            )
        arrived = was - waiting
        if arrived:
            names = ", ".join(sorted(arrived))
            log.info("%s: source canary of %s written; resyncing", self.source.name, names)
            for t in self.targets:
                t.owe(Cause.SOURCE_CANARY, names)
        if before is not None and ready.caps != before.caps:
            log.info("%s: its cluster config changed what is synced; resyncing", self.source.name)
            for t in self.targets:
                t.owe(Cause.SOURCE_CONFIG)
        return ready

    def _cached_readiness(self) -> Readiness | None:
        """A watcher that starts while its source has no cluster config: if a target caches
        one, the source had it and is being rebuilt (a clustermesh-apiserver restarting).
        The cached copy always says syncedCanaries (kvmesh marks it so), so the watcher takes
        the safe side and waits for the source's canaries; a source that does not write them
        stops being waited for as soon as its config is back without the capability.

        If no target caches one and a target cannot be read, RetryableError: that target may
        be the one that still caches it (the others' copies may have gone with a lease, or
        never been written by a first sync cut short), and a rebuilding source taken for one
        without a config would have every cache emptied by its resync. A source that never
        has a config then waits for every target to answer before its watcher starts."""
        key = RESOURCE_BY_NAME["config"].cache_prefix(self.source.name)
        unread: RetryableError | None = None
        for t in self.targets:
            try:
                kv = t.control.etcd.get(key)
                if kv is None:
                    continue
                cfg = parse_cluster_config(
                    kv.key,
                    kv.value,
                    self.layout.cluster_id,
                    self.layout.max_connected_clusters,
                    MAX_CACHED_CLUSTER_CONFIG,
                )
            except RetryableError as exc:
                unread = exc
                continue
            except BadInputError:
                continue
            return Readiness(replace(source_caps(cfg), synced_canaries=True), True)
        if unread is not None:
            raise RetryableError(
                f"{self.source.name} has no cluster config, and a target that may cache one "
                f"cannot be read: {unread}",
                unread.cluster,
            )
        return None

    def _check_source_canaries(self) -> None:
        """While resources wait, look for their source canaries on each tick."""
        if self.waiting:
            self._read_readiness(None)

    def _hold(self, count: int = 1) -> None:
        """Deletes held back: every target remembers it (a record), so that a watcher that
        takes over after the source canary appeared still sends them (with a resync)."""
        self.metrics.held_deletes.labels(self.source.name).inc(count)
        for t in self.targets:
            if not t.held_marked:
                try:
                    t.control.mark_held(True)
                    t.held_marked = True
                except RetryableError as exc:
                    log.warning(
                        "%s→%s: recording held deletes failed: %s", self.source.name, t.name, exc
                    )

    def _reject(self, exc: BadInputError) -> None:
        self.metrics.rejected.labels(self.source.name, exc.kind).inc()
        if self._reject_lines.take(exc.kind):
            log.warning("%s: not synced: %s", self.source.name, exc)

    # -- publishing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the buffered changes to every target's outbox, cut them into batches and
        publish them, unless the broker is full or failing: then publishing pauses, with a
        growing delay, the outboxes keep coalescing what comes meanwhile, and batches already
        cut wait in `unsent` to go out as they are. Nothing is dropped, and no resync is
        started for it, unless a target holds more than sync.max_held_changes or
        sync.max_held_bytes meanwhile (_bound_paused)."""
        self._flush_deadline = None
        if self._held_since is not None:  # it waited for a worker, and goes now
            src = self.source.name
            self.metrics.flushes_held.labels(src).inc()
            self.metrics.flush_held_seconds.labels(src).inc(self.clock() - self._held_since)
            self._held_since = None
        since = self.buffer.since  # when each shard's oldest change came (drain resets it)
        drained = self.buffer.drain()
        for t in self.targets:
            if t.need_resync:
                t.outbox.drain()  # its coming snapshot covers these changes
                t.unsent = []
                continue
            for shard, changes in drained.items():
                at = since.get(shard, 0)
                for c in changes:
                    if c.pos > t.skip[shard]:
                        t.outbox.add(shard, c, at)
        pending = [t for t in self.targets if t.unsent or len(t.outbox)]
        if not pending:
            return
        now = self.clock()
        if now < self._publish_after or self._queue_full(now):
            self._flush_deadline = max(self._publish_after, now + 0.5)
            self._bound_paused(pending)
            return
        # One publish for every target: a task carries batches for several targets, so a
        # flush costs tasks in proportion to what changed, not to the number of targets.
        # Target by target: a flush's share for one target mostly fits one transaction, and
        # a task then holds whole targets, each one transaction (in rows of one shard
        # across the targets, 64 batches to a task would split each target's share over
        # several tasks and transactions; docs/performance-log.md).
        out: list[tuple[Target, Batch]] = []
        for t in pending:
            unsent, t.unsent = t.unsent, []
            out += [(t, b) for b in unsent]
            if len(t.outbox):
                since_ms = t.outbox.since
                out += [(t, b) for b in self._cut_chains(t, t.outbox.drain(), since_ms)]
            self._mark(t)
        self._last_flush = now
        # what the queue held before this publish says nothing of it now: the next look
        # that decides on an idle flush, or on a wait for the workers, reads it again
        if self.sync.idle_flush or self.sync.flush_after_ack:
            self._queue_sample = (-math.inf, self._queue_sample[1])
        try:
            # the flush may fill what room the queue has left, and a task more: what does
            # not fit waits in unsent, as after a failed publish
            self._send(out, self._room())
        except QueueFullError as exc:
            self._pause_publishing("queue_full", f"{exc} ({exc.published} batches went out)")
            self._flush_deadline = self._publish_after
            self._bound_paused(pending)
            return
        except PublishError as exc:
            self._pause_publishing("broker_error", f"publishing failed: {exc}")
            self._flush_deadline = self._publish_after
            self._bound_paused(pending)
            return
        self._publish_backoff = 0.0

    def _mark(self, t: Target) -> None:
        """Remember that every event delivered so far is in *t*'s chains as they stand: the
        buffer was drained into its outbox and the outbox cut. When the fences reach these
        chains, the target holds every event up to here, however long ago a quiet shard's
        fence last moved (see _poll)."""
        mark = (t.pair.gen, self.feed.delivered_through(), dict(t.pair.chain))
        if len(t.marks) >= _MAX_MARKS:
            t.marks.pop()  # the newest replaces the one before: fewer steps, never wrong
        t.marks.append(mark)

    def _linger(self) -> float:
        """The least time between two flushes: none while the source's queue is empty
        (sync.idle_flush: the workers hold every task, and waiting would only delay the
        change), sync.linger while they keep up, longer (up to sync.max_linger) while tasks
        wait in the queue. A backlog then turns into fewer, larger tasks, each change
        costing less of the workers' time, instead of more small ones that deepen it. A
        change that comes after a quiet spell longer than this is published at once."""
        now = self.clock()
        idle = self._idle_flush(now)
        depth = self._depth(now, _IDLE_LOOK if idle else _DEPTH_EVERY)
        if idle and depth == 0:
            # every task published is in a worker's hands: waiting would only delay this
            # change; the workers' pace spaces the flushes while they are busy
            return 0.0
        longest = max(self.sync.max_linger, self.sync.linger)
        return min(longest, self.sync.linger + max(0, depth - _KEEPING_UP) * _PER_TASK)

    def _held_by_workers(self, now: float) -> bool:
        """Whether a flush that is due waits, with sync.flush_after_ack, because a shard it
        has changes for has its last task in a worker's hands: that task's successor could
        only wait for it in another worker (a failed transaction, then reads of the fence),
        and with many pool slots the tasks of busy shards queued up behind each other that
        way (docs/performance-log.md, 2026-12-02). Waiting here gathers the shard's next
        changes into one task instead, sent once the worker is done. The wait ends
        sync.max_linger after the last flush at the latest, and looks at the workers again
        every _IDLE_LOOK (the flush deadline is moved along)."""
        if (
            not self.sync.flush_after_ack
            or now - self._last_flush >= max(self.sync.max_linger, self.sync.linger)
            or now < self._publish_after
        ):
            return False
        shards = self.buffer.counts().keys()
        if not self.publisher.tracks(shards):
            return False  # no task of these shards to wait for: no look
        # the look that decided the flush asked about the shards buffered then; a shard
        # that came since makes a look of its own, unless that look already holds the flush
        answered = shards <= self._asked or not self.publisher.busy_shards().isdisjoint(shards)
        self._depth(now, _IDLE_LOOK if answered else 0.0)
        if self.publisher.busy_shards().isdisjoint(shards):
            return False
        if self._held_since is None:
            self._held_since = now
        # looked at again in _IDLE_LOOK; never sooner than the deadline the linger set
        self._flush_deadline = max(self._flush_deadline or now, now + _IDLE_LOOK)
        return True

    def _may_go_early(self, now: float) -> bool:
        """Whether a lingering flush looks at the queue every _IDLE_LOOK, to go as soon as
        it empties: with the idle flush, and while at most _KEEPING_UP tasks waited at the
        last look (a deeper queue is looked at when the linger ends)."""
        return self._idle_flush(now) and self._queue_sample[1] <= _KEEPING_UP

    def _idle_flush(self, now: float) -> bool:
        """Whether a flush may skip the linger once the queue is empty (sync.idle_flush):
        publishing is open, fewer changes wait than there are shards, and the source's
        changes come slower than sync.idle_flush_max_rate. A flush touches one batch per
        shard it has changes for, and the next flush's batches of those shards wait for it:
        a few changes touch a few shards and their tasks mostly run side by side, while a
        burst published piecemeal as fast as it comes would chain every shard from task to
        task (the linger lets it gather instead). A steady stream of changes is the same
        at a smaller scale: fast workers empty the queue between two of its flushes, and
        each flush would then carry a few changes, a task each, whose fixed cost (Redis,
        the worker's hand-over, a transaction) is what the workers then spend their time
        on; lingering gathers ten or more, for no more latency where that cost is what
        keeps the cores busy (docs/performance-log.md, 2026-12-01)."""
        limit = self.sync.idle_flush_max_rate
        return (
            self.sync.idle_flush
            and self.sync.linger > 0
            and now >= self._publish_after
            and len(self.buffer) < max(2, self.sync.shards)
            and (not limit or self._arrival_rate(now) < limit)
        )

    def _arrival_rate(self, now: float) -> float:
        """The source's changes a second, lately: each change delivered counts
        1/_RATE_WINDOW and fades by e every _RATE_WINDOW seconds, so a steady rate reads as
        itself and a quiet spell of a few windows as nothing."""
        elapsed = now - self._rate_at
        if elapsed <= 0:
            return self._rate
        return self._rate * math.exp(-elapsed / _RATE_WINDOW)

    def _depth(self, now: float, max_age: float = _DEPTH_EVERY) -> int:
        """The source queue's depth, read from Redis unless a sample is fresher than
        *max_age* seconds."""
        when, depth = self._queue_sample
        if now - when >= max_age:
            # with sync.flush_after_ack, the same round trip finds which buffered shards
            # have their last task in a worker's hands (_held_by_workers)
            self._asked = set(self.buffer.counts()) if self.sync.flush_after_ack else set()
            try:
                depth = self.publisher.backlog(self._asked)
            except RetryableError:
                depth = 0  # the publish itself will tell
            else:
                self.metrics.queue_depth.labels(self.source.name).set(depth)
                self.metrics.queue_bytes.labels(self.source.name).set(self.publisher.queued_bytes())
            self._queue_sample = (now, depth)
        return depth

    def _queue_full(self, now: float) -> bool:
        """Whether the source queue holds sync.max_queue_depth tasks or more, or
        sync.max_queue_bytes of this watcher's tasks (looked at no more often than every
        _DEPTH_EVERY seconds). Redis is every source's: one whose large values filled it
        would stop every watcher's publishing, where this bound stops its own."""
        full = self._at_bound(self._depth(now))
        if full:
            self._pause_publishing("queue_full", full)
        return bool(full)

    def _at_bound(self, depth: int) -> str:
        """Why a queue of *depth* tasks, and of this watcher's tasks' bytes as last read,
        is at one of its bounds (sync.max_queue_depth, sync.max_queue_bytes); "" if it is
        at neither."""
        size = self.publisher.queued_bytes()
        if depth >= self.sync.max_queue_depth:
            return f"its queue holds {depth} tasks"
        if size >= self.sync.max_queue_bytes:
            return f"its queue holds {size} bytes of tasks ({depth} tasks)"
        return ""

    def _room(self) -> int:
        """The bytes of tasks the queue may still take (sync.max_queue_bytes), as last read."""
        return self.sync.max_queue_bytes - self.publisher.queued_bytes()

    def _bound_paused(self, targets: list[Target]) -> None:
        """While publishing is paused, a target holding more than sync.max_held_changes
        changes, or more than sync.max_held_bytes of their keys and values (in its outbox,
        and in batches cut but not published), drops them and is resynced instead: the
        outbox keeps a delete for every key touched, so a source that creates and deletes
        keys faster than the workers keep up would grow it (and the burst it becomes on
        resuming) without bound, where a snapshot holds only the keys that exist; and a
        source of large values would have it hold a copy of all of them."""
        limit, limit_bytes = self.sync.max_held_changes, self.sync.max_held_bytes
        for t in targets:
            if t.need_resync:
                continue
            held, size = t.held()
            if held > limit:
                why = f"{held} changes held while publishing was paused (over {limit})"
            elif size > limit_bytes:
                why = (
                    f"{size} bytes of changes held while publishing was paused (over {limit_bytes})"
                )
            else:
                continue
            log.warning("%s→%s: %s; resyncing instead", self.source.name, t.name, why)
            t.outbox.drain()
            t.unsent = []
            t.owe(Cause.OUTBOX_FULL, why)

    def _pause_publishing(self, reason: str, why: str) -> None:
        self._publish_backoff = min(max(0.5, self._publish_backoff * 2), 10.0)
        self._publish_after = self.clock() + self._publish_backoff
        self.metrics.publish_paused.labels(self.source.name, reason).inc()
        log.warning(
            "%s: publishing paused for %.1fs: %s", self.source.name, self._publish_backoff, why
        )

    def _cut_chains(
        self, t: Target, per_shard: dict[str, list[Change]], since: dict[str, int] | None = None
    ) -> list[Batch]:
        """Cut each shard's changes into batches chained after the shard's last one, in an
        order interleaved across shards: consecutive tasks then belong to different shards,
        so parallel workers rarely wait on a predecessor. *since*: per shard, when its oldest
        change was received (carried in its batches for the lag histogram)."""
        chains: list[list[Batch]] = []
        rank = self._shard_rank
        for shard, changes in sorted(per_shard.items(), key=lambda kv: rank.get(kv[0], len(rank))):
            if changes:
                chain = make_batches(
                    source=self.source.name,
                    target=t.name,
                    shard=shard,
                    gen=t.pair.gen,
                    prev=t.pair.chain[shard],
                    changes=changes,
                    max_ops=self.sync.max_batch_ops,
                    max_bytes=self.sync.max_batch_bytes,
                    event_ms=(since or {}).get(shard, 0),
                )
                t.pair.chain[shard] = chain[-1].pos  # the next batch follows these, sent or not
                chains.append(chain)
        # Round robin over segments of each chain, a task's worth of full batches long: a
        # burst then becomes tasks of one shard each (the publisher keeps a segment in one
        # task), and the tasks of one round touch different shards, so that the pool applies
        # them in parallel instead of each waiting for another's predecessor. A flush of
        # small changes has one batch per shard, and interleaves them as before.
        seg = max(1, min(MAX_BATCHES_PER_TASK, MAX_OPS_PER_TASK // max(1, self.sync.max_batch_ops)))
        rows = [[chain[i : i + seg] for i in range(0, len(chain), seg)] for chain in chains]
        batches = [b for row in itertools.zip_longest(*rows) for part in row if part for b in part]
        try:
            return self._on_leases(t, batches)
        except RetryableError as exc:
            # the chains moved on without these: the target gets a resync instead
            log.warning("%s→%s: granting a lease failed: %s", self.source.name, t.name, exc)
            t.owe(Cause.TARGET_UNAVAILABLE, str(exc))
            return []

    def _on_leases(self, t: Target, batches: list[Batch]) -> list[Batch]:
        """Put each batch's keys on the target's current lease (sync.cache_lease_ttl)."""
        leases = t.control.leases
        if not leases.tracking:
            return batches
        out = []
        gen, chain = t.pair.gen, t.pair.chain
        for b in batches:
            puts = [o.key for o in b.ops if o.op is Op.PUT]
            deletes = [o.key for o in b.ops if o.op is not Op.PUT]
            lease = leases.take(puts, deletes, gen, chain)
            out.append(replace(b, lease=lease) if lease else b)
        return out

    def _send(self, out: list[tuple[Target, Batch]], budget: int | None = None) -> None:
        """Publish batches already chained, up to *budget* bytes and a task (see
        Publisher.publish); on a failure each target keeps the rest of its own in t.unsent,
        in order. A publish the broker took although it reported an error is then sent
        twice, which the fence makes a duplicate: the batch is the same, never re-cut."""
        if not out:
            return
        published = len(out)
        try:
            # a flush is small batches for many targets: as many to a task as a task takes
            # (the worker applies each target's in one transaction), and for one target
            # no more than one transaction holds; a snapshot keeps sync.batches_per_task,
            # so that its large batches spread over the workers
            self.publisher.publish(
                [b for _, b in out],
                MAX_BATCHES_PER_TASK,
                txn_ops=self.sync.max_batch_ops + 1,
                budget=budget,
                track=self.sync.flush_after_ack,
            )
        except PublishError as exc:
            published = exc.published
            for t, b in out[published:]:
                t.unsent.append(b)
            raise
        finally:
            sent: dict[int, tuple[Target, list[Batch]]] = {}
            for t, b in out[:published]:
                sent.setdefault(id(t), (t, []))[1].append(b)
            for t, batches in sent.values():
                self._count_published(t, batches)

    def _count_published(self, t: Target, batches: list[Batch]) -> None:
        self.metrics.batches.labels(self.source.name, t.name).inc(len(batches))
        self.metrics.ops.labels(self.source.name, t.name).inc(sum(len(b.ops) for b in batches))

    # -- the fence poll ----------------------------------------------------------------------

    def tick(self) -> None:
        """Fence poll: canaries, progress, stalls, resync requests, anti-entropy, drains."""
        now = self.clock()
        if self.sync.resync_interval > 0:
            if self._next_antientropy == 0.0:
                self._next_antientropy = now + self.sync.resync_interval
            elif now >= self._next_antientropy:
                self._next_antientropy = now + self.sync.resync_interval
                for t in self.targets:
                    t.owe(Cause.ANTI_ENTROPY)
        self._depth(now)  # keeps kvmesh_watcher_queue_depth fresh in a quiet mesh too
        for kind, held, seconds in self._reject_lines.overdue():
            log.warning(
                "%s: %d more changes not synced as %s in the last %.0fs, counted in "
                "kvmesh_watcher_rejected_total and not logged one by one (%d lines a minute "
                "of each reason are)",
                self.source.name,
                held,
                kind,
                seconds,
                _REJECT_LINES,
            )
        try:
            self._check_source_canaries()
        except RetryableError as exc:
            log.warning("%s: reading its source canaries failed: %s", self.source.name, exc)
        for t in self.targets:
            if t.control.leases.lost.is_set():
                t.control.leases.lost.clear()
                t.owe(Cause.LEASE_EXPIRED, "a lease of its cached keys ended")
        answered: list[Target] = []  # targets owed a resync that answered just now
        for t, records in self._read_records(now):
            probe = t.need_resync is not None  # read to see whether it answers
            try:
                if isinstance(records, Exception):
                    raise records
                if not probe:
                    self._poll(t, now, records)
            except RetryableError as exc:
                t.poll_backoff = min(max(1.0, t.poll_backoff * 2), _POLL_BACKOFF_MAX)
                t.poll_after = self.clock() + t.poll_backoff
                log.warning(
                    "%s→%s: %s failed: %s; next try in %.0fs",
                    self.source.name,
                    t.name,
                    "the read before its resync" if probe else "fence poll",
                    exc,
                    t.poll_backoff,
                )
                continue
            except Exception:
                # A target's records are input too: whatever they make fail, this target
                # is resynced (which rewrites them) and the others go on.
                what = "the read before its resync" if probe else "fence poll"
                log.exception("%s→%s: %s failed", self.source.name, t.name, what)
                self.metrics.errors.labels(self.source.name, "fence_poll").inc()
                t.owe(Cause.CORRUPT_RECORD, f"the {what} failed")
            t.poll_backoff = 0.0  # it answered
            # one owed a resync by this poll answered just now too (and its resync goes
            # now if due, as a probe's went once due when it began)
            if probe or (t.need_resync and self._due(t, now)):
                answered.append(t)
        self._kvstore_gauges()
        if now >= self._next_drain:
            self._next_drain = now + self.sync.drain_check_interval
            self._drain()
        # only targets that answered a read just now: a call to one that drops packets
        # would hold the loop, and every other pair with it, for sync.etcd_timeout
        pending = [t for t in answered if t.need_resync]
        if pending:
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

    def _kvstore_gauges(self) -> None:
        """KVStoreMesh's per-scope gauges: changes held, resources read and written."""
        src = self.source.name
        held: dict[str, int] = dict.fromkeys((r.scope for r in RESOURCES), 0)
        for shard, n in self.buffer.counts().items():
            parsed = parse_shard(shard)
            if parsed is not None:
                held[parsed[0].scope] += n
        behind: dict[str, int] = dict.fromkeys(held, 0)
        for t in self.targets:
            mine: dict[str, int] = dict.fromkeys(held, 0)
            for shard, n in t.outbox.counts().items():
                parsed = parse_shard(shard)
                if parsed is not None:
                    mine[parsed[0].scope] += n
            for b in t.unsent:
                parsed = parse_shard(b.shard)
                if parsed is not None:
                    mine[parsed[0].scope] += len(b.ops)
            behind = {k: max(v, mine[k]) for k, v in behind.items()}
        waiting = self.waiting
        for res in RESOURCES:
            self.metrics.sync_queue.labels(res.scope, src).set(held[res.scope] + behind[res.scope])
            self.metrics.scope_synced.labels(res.scope, src, "read").set(
                int(res.name not in waiting)
            )
            if res.canary is not None:
                written = all(res.name in t.pair.canaried for t in self.targets)
                self.metrics.scope_synced.labels(res.scope, src, "write").set(int(written))

    def _read_records(self, now: float) -> list[tuple[Target, TargetRecords | Exception]]:
        """The records of each target due for a poll, or what reading them raised. The reads
        go side by side on this watcher's poller threads, and the poll waits _POLL_WAIT at
        most for those it began: a target that drops packets, whose read lasts
        sync.etcd_timeout, holds up neither the other pairs' polls nor the loop (for longer
        than that, once). Its read is taken up by the first poll after it is over, unless
        the target opened a generation meanwhile. A target whose last read failed is not
        waited for at all: its read is taken up by the next poll at the earliest, so the
        tries of one that keeps dropping packets cost the loop nothing. A target owed a
        resync is read the same way once its resync is due (_due): such a read that came
        back lets the resync go."""
        fresh = []
        for t in self.targets:
            if t.reading is None and now >= t.poll_after and self._due(t, now):
                read: Callable[[], TargetRecords] = t.control.read
                if t.need_resync is not None:
                    t.progress_due = None  # its resync writes its records anew
                if t.progress_due is not None:
                    write, through, when = t.progress_due
                    written: list[bool] = []
                    t.progress_due, t.progress_sent = None, (through, when, written)
                    read = functools.partial(_write_then_read, write, written, read)
                t.reading = self._pollers.submit(_call, read)
                t.reading_gen = t.pair.gen
                t.reading_probe, t.reading_at = t.need_resync is not None, now
                if not t.poll_backoff:
                    fresh.append(t.reading)
        # a read still under way from an earlier poll is not waited for again
        if fresh:
            wait(fresh, timeout=_POLL_WAIT)
        out: list[tuple[Target, TargetRecords | Exception]] = []
        for t in self.targets:
            if t.reading is None or not t.reading.done():
                continue
            if t.poll_backoff and t.reading_at >= now:
                continue  # begun by this poll after a failed one: a later poll takes it up
            records = t.reading.result()
            t.reading = None
            if t.progress_sent is not None:
                through, when, written = t.progress_sent
                t.progress_sent = None
                if written and written[0] and t.pair.gen == t.reading_gen:
                    t.progress_rev, t.progress_at = through, when
                    self.metrics.applied_revision.labels(self.source.name, t.name).set(through)
            if t.need_resync:
                # it answers only if this read began while it was owed, in this term: one
                # begun before (by a poll, or by the last term) may predate its silence.
                # (A read that began while due counts even if a failed resync of another
                # target has pushed the resyncs' backoff on since.)
                if t.reading_probe and t.reading_at >= self._term_started:
                    out.append((t, records))
            elif t.pair.gen == t.reading_gen:
                out.append((t, records))
        return out

    def _due(self, t: Target, now: float) -> bool:
        """Whether *t* is due for a read: a fence poll, or, while it is owed a resync, the
        probe that decides whether the resync may go (once the resyncs' spacing and
        backoff allow one)."""
        if not t.need_resync:
            return True
        return now >= t.resync_after and now >= self._resync_after

    def _poll(self, t: Target, now: float, records: TargetRecords) -> None:
        src = self.source.name
        found = assess(records, t.pair, now, self.sync.stall_timeout, self.waiting)
        if found.request is not None:
            mod_revision, outcome = found.request
            t.control.take_request(mod_revision)
            self.metrics.resync_requests.labels(src, t.name, outcome).inc()
            if outcome == "ignored":
                log.warning(
                    "%s→%s: ignored a resync request that no worker of generation %d wrote",
                    src,
                    t.name,
                    t.pair.gen,
                )
        if found.resync is not None:
            t.owe(found.resync.cause, found.resync.detail)
            return
        # A stalled shard is a loss only while nothing is left in the queue to deliver its
        # next batch: a slow backlog keeps fences moving, a stopped pool keeps the queue full.
        if found.stalled and self.publisher.backlog() == 0:
            self.metrics.stalls.labels(src, t.name).inc()
            t.owe(Cause.STALLED, f"shards {', '.join(found.stalled[:3])} stalled")
            return
        if not self._write_canaries(t, found.canaries):
            return
        done = all(r.name in t.pair.canaried for r in RESOURCES if r.canary is not None)
        self.metrics.initial_sync.labels(src, t.name).set(int(done))
        self.metrics.readiness.labels(src, t.name).set(int(done))
        if done:
            self.synced_once.add(t.name)
            if t.name not in self._synced_term:
                self._synced_term.add(t.name)
                if len(self._synced_term) == len(self.targets):
                    self.metrics.bootstrap.labels(src).set(self.clock() - self._term_started)
        t.control.leases.collect(self._landed(t, found.fences), t.pair.gen, t.pair.chain)
        self.metrics.cache_leases.labels(src, t.name).set(len(t.control.leases.known))
        through = applied_through(
            self.feed.delivered_through(),
            [self.buffer.min_position(), t.outbox.min_position()],
            found.fences,
            t.pair,
            t.snapshot_rev,
        )
        landed = self._landed(t, found.fences)
        while t.marks and (t.marks[0][0] != t.pair.gen or landed(t.marks[0][0], t.marks[0][2])):
            gen, rev, _ = t.marks.popleft()
            if gen == t.pair.gen:
                t.mark_through = (gen, rev)
        if t.mark_through[0] == t.pair.gen and through > 0:
            # a fence left behind by a shard nothing changed in since pins applied_through
            # to that fence; the landed marks say how far every shard is complete
            through = max(through, t.mark_through[1])
        # Write when something synced moved, or as a slow heartbeat: every write bumps the
        # target's revision, and in a full mesh that target is another watcher's source.
        due = t.progress_at == 0.0 or now - t.progress_at >= _PROGRESS_HEARTBEAT
        moved = through > t.progress_rev and (self.feed.last_event_rev > t.progress_rev or due)
        if moved:
            # what the record says is taken now; it is written by the target's next read,
            # on a poller thread: a target that goes silent right after this read must not
            # hold up every other pair on the loop for the write's deadline
            write = functools.partial(
                t.control.write_progress,
                t.gen_rev,
                t.pair.gen,
                through,
                self.feed.kept_writes(),
                self.feed.newest,
                self._record_base(t),
                self.feed.open_listing(),
            )
            t.progress_due = (write, through, now)

    @staticmethod
    def _landed(
        t: Target, fences: dict[str, FenceRecord]
    ) -> Callable[[int, dict[str, Position]], bool]:
        """Whether every batch up to *chain* of generation *gen* has landed in the target or
        can no longer land: a newer generation makes older batches obsolete; in the same
        one, each shard's fence must be done and at or past the chain."""

        def landed(gen: int, chain: dict[str, Position]) -> bool:
            if t.pair.gen != gen:
                return t.pair.gen > gen
            for shard, pos in chain.items():
                f = fences.get(shard)
                if f is None or f.gen != gen or not f.done or f.pos < pos:
                    return False
            return True

        return landed

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

    def _drain(self) -> None:
        """Drain removed sources from every configured target: not only this source's (a
        target that is no other source's target, its own cluster, must be drained too)."""
        configured = [c.name for c in self.settings.sources]
        clients = {t.name: t.control.etcd for t in self.targets}
        # a target of this source that did not answer its last poll, is still reading, or
        # is owed a resync (one it may not answer: the drain waits for it) is left out: one
        # that does not answer would hold the loop up for a sync.etcd_timeout a call
        skipped = {t.name for t in self.targets if t.silent or t.need_resync}
        for c in self.settings.targets:
            if c.name in skipped:
                clients.pop(c.name, None)
            elif c.name not in clients:
                if c.name not in self._drain_clients:
                    self._drain_clients[c.name] = self._etcd(c, self.sync.etcd_timeout, WRITE)
                clients[c.name] = self._drain_clients[c.name]
        verdicts: dict[str, bool | None] = {}  # one look at each source's lease a check
        for name, client in clients.items():
            watched = functools.partial(self._drain_waits, verdicts, name)
            try:
                with client.patience(self.sync.loop_etcd_timeout):
                    drain_removed(client, name, configured, self.sync.drain_grace, watched=watched)
            except RetryableError as exc:
                log.warning("%s: drain check failed: %s", name, exc)
            except Exception:
                log.exception("%s: drain check failed", name)
                self.metrics.errors.labels(self.source.name, "drain").inc()

    def _drain_waits(
        self, verdicts: dict[str, bool | None], target: str, source: str
    ) -> bool | None:
        """Whether a watcher may be syncing *source*, which *target* caches and this
        watcher's config lacks (the drain leaves it alone unless False): one look at its
        lease per drain check (*verdicts*), the first wait logged, each counted."""
        if source not in verdicts:
            verdicts[source] = busy = self._watched(source)
            if busy is False:
                self._drain_waits_said.discard(source)
            elif source not in self._drain_waits_said:
                self._drain_waits_said.add(source)
                log.warning(
                    "source %s is not in this watcher's config, but a watcher may still be "
                    "syncing it (%s): it is not drained while that lasts. Do all kvmesh watch "
                    "processes run the same config?",
                    source,
                    "Redis gave no answer" if busy is None else "its lease has a value",
                )
        busy = verdicts[source]
        if busy is not False:
            self.metrics.drain_waits.labels(source, target).inc()
        return busy

    # -- generations -------------------------------------------------------------------------

    def _open(
        self,
        t: Target,
        *,
        allow_resume: bool,
        source_rev: int,
        read_back: list[tuple[bytes, int]] | None = None,
        witnessed: list[Vouch] | None = None,
        records: TargetRecords | None = None,
    ) -> int | None:
        """Open a new generation in the target. If its records allow (and allow_resume),
        resume: returns the revision the watch must start from. Otherwise the target is owed
        a resync (for the reason plan_start gives) and None is returned. The source writes
        that the target's progress record lists, and the newest event it names, are read
        back first (before the generation moves, so that a source failing now costs a
        retry, not a resync); those that are there are added to *read_back* and
        *witnessed*. *records* are the target's, if they were just read."""
        src = self.source.name
        if records is None:
            records = t.control.read()
        t.held_marked = records.held
        plan: Resume | Resync | None = None
        writes: list[tuple[bytes, int]] = []
        verified: list[int] = []  # revisions of those read back as written
        vouch: Vouch | None = None  # what the record vouches for, read back (None: not asked)
        if allow_resume:
            plan = plan_start(
                records,
                SourceFacts(
                    self.shards,
                    self.sync.shards,
                    self.sync.identities,
                    self.feed.cluster_id,
                    source_rev,
                ),
            )
            if isinstance(plan, Resume) and records.gen is not None:
                # the fences are positions in the source's history: the writes the last term
                # saw must still be there (a source etcd back empty may be past the fences)
                writes = [
                    (k, m)
                    for k, m in progress_writes(records.progress, records.gen.gen)
                    if self.feed.resource_of(k) is not None
                ]
                ahead = max((m for _, m in writes), default=0)
                gone = (
                    f"revision {source_rev} is below {ahead}, already seen"
                    if ahead > source_rev
                    else self.feed.unseen(writes, verified)
                )
                if gone is not None:
                    plan = Resync(Cause.SOURCE_REPLACED, f"before this term: {gone}")
            if isinstance(plan, Resume) and records.gen is not None:
                plan, vouch = self._vouch(records, plan, source_rev, max(verified, default=0))
            if isinstance(plan, Resume) and records.held and not self.waiting:
                # deletes were held for a source canary that has appeared since: resync
                plan = Resync(Cause.SOURCE_CANARY, "deletes held before this term")
        gen = new_generation(records, t.pair.gen, self.wall_ms())
        record = GenRecord(gen, self.sync.shards, self.sync.identities, self.feed.cluster_id)
        t.gen_rev = t.control.open_generation(records, record)
        if isinstance(plan, Resume) and vouch is not None:
            # batches of the old generation may have landed while the source was read back;
            # none can now, and a fence they moved past the vouched revision is no resume
            why = unrecorded(t.control.read().fences, vouch.revision)
            if why is not None:
                plan = Resync(Cause.UNRECORDED, why)
        t.poll_after = t.poll_backoff = 0.0  # it answers: its fence poll waits no more
        t.pair = PairState(gen=gen, chain={s: (0, 0) for s in self.shards})
        t.progress_due = t.progress_sent = None  # the old generation's, refused if sent now
        t.outbox.drain()  # owed to the old generation: the new one starts from its fences
        t.unsent = []
        self.metrics.generation.labels(src, t.name).set(gen)
        if plan is None:
            return None
        if not isinstance(plan, Resume):
            t.need_resync, t.resync_detail = plan.cause, plan.detail
            return None
        t.pair.chain = dict(plan.chain)
        t.skip = dict(plan.skip)
        t.control.write_fences(
            t.gen_rev, {s: FenceRecord(gen, plan.chain[s], True) for s in self.shards}
        )
        t.need_resync = None
        t.snapshot_rev = 0
        # the new generation's progress record at once, with the writes just read back and
        # the config: a term that ends before anything moves leaves its successor them too
        config = [(self.feed.config_key, self.feed.config_rev)] if self.feed.config_rev else []
        kept = list(dict(config + writes).items())
        # it vouches for what the last one did: the event read back, or the revision that
        # record vouched for (the watch resumes at or before it)
        carried = Vouch(None, plan.through) if vouch is None else vouch
        base = carried.revision
        last, listing = carried.last, carried.listing
        t.control.write_progress(t.gen_rev, gen, plan.through, kept, last, base, listing)
        t.progress_rev = plan.through
        if read_back is not None:
            read_back += writes
        if witnessed is not None:
            witnessed.append(Vouch(last, base, listing))
        self.metrics.resumes.labels(src, t.name).inc()
        log.info("%s→%s: generation %d resumes from the fences", src, t.name, gen)
        return plan.watch_from

    def _vouch(
        self, records: TargetRecords, plan: Resume, source_rev: int, read_back: int
    ) -> tuple[Resume | Resync, Vouch | None]:
        """The resume *plan* cut to what the progress record vouches for, or the resync owed
        instead; with what it vouches for, read back (None for a record of before): the
        newest event it names, read back as taken, and the listing it names, read back as
        listed (None when an event past it vouches for it). *read_back* is the newest of
        the record's writes read back as written.

        A source that lost the end of its history has given the lost revisions to other
        writes: a resume would take them for landed (the fences) or for empty (the
        record's revision) and skip them. The history is lost from some
        revision on, so the newest event the last term took, still there as taken, vouches
        for every revision up to its own; with none, the revision its watch began at does
        (a listing's, or one the term before vouched for). Fences past that are batches
        that landed after the record: a resync. The watch resumes just past it, never past
        the record's revision alone: the revisions between held no synced event, but may
        hold new ones if they were lost. With no event past the listing the term before began
        with, what that listing held must still be there at its revision."""
        assert records.gen is not None

        def resync(cause: Cause, detail: str) -> tuple[Resync, None]:
            return Resync(cause, detail), None

        recorded = progress_vouch(records.progress, records.gen.gen)
        if recorded is UNKNOWN:
            return plan, None  # a record of before: its writes read back
        if recorded is UNVOUCHED:  # the writes it names, read back, vouch for theirs
            vouch = Vouch(None, read_back)
        else:
            assert isinstance(recorded, Vouch)
            vouch = recorded
            last, vouched = vouch.last, vouch.revision
            if vouched > source_rev:
                below = f"revision {source_rev} is below {vouched}, already seen"
                return resync(Cause.SOURCE_REPLACED, f"before this term: {below}")
            if last is not None:
                try:
                    gone = self.feed.witness_gone(last)
                except CompactedError:  # and a watch from there would be too
                    detail = f"its newest event, at revision {last.revision}, compacted away"
                    return resync(Cause.COMPACTED, detail)
                except PermissionDeniedError as exc:
                    detail = f"its newest event cannot be read back: {exc}"
                    return resync(Cause.UNRECORDED, detail)
                if gone is not None:
                    return resync(Cause.SOURCE_REPLACED, f"before this term: {gone}")
            listing = vouch.listing
            if listing is not None and last is not None and last.revision >= listing.revision:
                vouch = replace(vouch, listing=None)  # the event read back vouches for it
            elif listing is not None:
                if listing.revision > source_rev:
                    below = f"revision {source_rev} is below {listing.revision}, already listed"
                    return resync(Cause.SOURCE_REPLACED, f"before this term: {below}")
                gone = self.feed.listing_gone(listing)
                if gone is not None:
                    return resync(Cause.SOURCE_REPLACED, f"before this term: {gone}")
        vouched = vouch.revision
        through = min(plan.through, vouched)
        skip = {s: max(pos, (through, END)) for s, pos in plan.chain.items()}
        resume = Resume(chain=plan.chain, skip=skip, through=through)
        # a watch from a revision the source compacted is refused, and one from just past
        # the compaction would miss the deletes compacted with it: the feed would find
        # that and resync every target, where this one alone needs it
        after = resume.watch_from - 1
        if self.feed.compacted_past(after):
            detail = f"the revision its watch would resume after, {after}, compacted away"
            return resync(Cause.COMPACTED, detail)
        why = unrecorded(records.fences, vouched)
        if why is not None:
            return resync(Cause.UNRECORDED, why)
        return resume, vouch

    def _resync(self, targets: list[Target]) -> int:
        """Open a new generation in each target, list the source at one revision R and
        publish, while listing, only what differs from each target. Returns R."""
        src = self.source.name
        rev = self.feed.etcd.revision()
        ready = self._read_readiness(rev)
        snapshots: list[tuple[Target, Cause, resync.Snapshot]] = []
        for t in targets:
            reason = t.need_resync or Cause.START
            try:
                # a resync rewrites what a lost lease took
                t.control.leases.ensure_loaded(wait=self.sync.loop_etcd_timeout)
                t.control.leases.check_current()
                self._open(t, allow_resume=False, source_rev=rev)
                t.control.clear_rejected()  # this snapshot decides anew
                t.control.write_fences(
                    t.gen_rev, {s: FenceRecord(t.pair.gen, (rev, 0), False) for s in self.shards}
                )
            except RetryableError as exc:
                log.warning("%s→%s: cannot start a resync: %s", src, t.name, exc)
                t.need_resync = reason
                continue
            t.control.leases.relist()  # the listing corrects the map of keys to leases
            t.need_resync = reason  # set until the whole snapshot is published
            t.pair.chain = {s: (rev, 0) for s in self.shards}
            t.skip = {s: (rev, END) for s in self.shards}
            t.snapshot_rev = rev
            t.progress_rev, t.progress_at = 0, 0.0
            cutter = SnapshotCutter(
                source=src,
                target=t.name,
                gen=t.pair.gen,
                revision=rev,
                max_ops=self.sync.max_batch_ops,
                max_bytes=self.sync.max_batch_bytes,
            )
            snapshots.append(
                (
                    t,
                    reason,
                    resync.Snapshot(t.control, cutter, self._snapshot_publisher(t)),
                )
            )
        if not snapshots:
            raise _NoTargetReachable("no target reachable for the resync")
        started = self.clock()
        listed = self._listed(rev, snapshots)
        newest: dict[str, tuple[bytes, int]] = {}
        tally: dict[str, tuple[int, int]] = {}
        try:
            resync.run(
                self.feed.etcd,
                self.layout,
                rev,
                [snap for _, _, snap in snapshots],
                shard_count=self.sync.shards,
                page=self.sync.page_size,
                max_bytes=self.sync.max_batch_bytes,
                on_reject=self._reject,
                keep_going=lambda: (
                    not self.stop_event.is_set() and self._keep_lease() and listed(None)
                ),
                readiness=ready,
                on_listed=listed,
                newest=newest,
                tally=tally,
            )
        except BaseException:
            for t, _, _ in snapshots:
                t.control.leases.settle(t.pair.gen, None)  # the listing did not end
            raise
        self.feed.config_rev = ready.config_rev
        # writes of this etcd for the feed to read back after a reconnect: with the config
        # alone, an owner that rebuilt an empty etcd config first would pass for this one
        # and what it listed, which no event vouches for until one comes after it
        self.feed.adopt_listing(Listing(rev, tally), newest)
        for t, reason, snap in snapshots:
            if snap.failed:
                t.control.leases.settle(t.pair.gen, None)  # the map keeps what it had
                continue
            last = snap.cutter.last_positions()
            try:  # shards the snapshot did not touch are complete already
                t.control.write_fences(
                    t.gen_rev,
                    {
                        s: FenceRecord(t.pair.gen, (rev, 0), True)
                        for s in self.shards
                        if s not in last
                    },
                )
            except RetryableError as exc:
                log.warning("%s→%s: resync failed: %s", src, t.name, exc)
                t.control.leases.settle(t.pair.gen, None)
                continue
            t.pair.chain.update(last)
            t.control.leases.settle(t.pair.gen, t.pair.chain)
            t.need_resync = None
            cutter = snap.cutter
            self.metrics.resyncs.labels(src, t.name, reason.value).inc()
            for kind, n in (
                ("missing", cutter.missing),
                ("different", cutter.different),
                ("extra", cutter.extra),
            ):
                self.metrics.resync_keys.labels(src, t.name, kind).inc(n)
            if not self.waiting and t.held_marked:
                try:
                    t.control.mark_held(False)  # this resync sent every delete owed
                    t.held_marked = False
                except RetryableError as exc:
                    log.warning("%s→%s: clearing the held record failed: %s", src, t.name, exc)
            if snap.held:
                self._hold(snap.held)
                log.info(
                    "%s→%s: %d keys only the target holds kept until their source canary",
                    src,
                    t.name,
                    snap.held,
                )
            log.info(
                "%s→%s: generation %d resynced at revision %d (%s%s): %d missing, "
                "%d different, %d extra, in %.2fs",
                src,
                t.name,
                t.pair.gen,
                rev,
                reason.value,
                f": {t.resync_detail}" if t.resync_detail else "",
                cutter.missing,
                cutter.different,
                cutter.extra,
                self.clock() - started,
            )
        return rev

    def _listed(
        self, rev: int, snapshots: list[tuple[Target, Cause, resync.Snapshot]]
    ) -> Callable[[Resource | None], bool]:
        """During a resync, after each resource is listed (and now and then while one is):
        close the fences of that resource's shards the snapshot did not touch, and write the
        canaries of resources already complete in a target, without waiting for the rest
        of the listing, as each resource's readers wait for its canary only."""
        every = min(_LOOK_DURING_RESYNC, self.sync.fence_poll_interval)
        next_look = self.clock() + every

        def listed(res: Resource | None) -> bool:
            nonlocal next_look
            for t, _, snap in snapshots:
                if snap.failed:
                    continue
                try:
                    if res is not None:
                        last = snap.cutter.last_positions()
                        untouched = {
                            s: FenceRecord(t.pair.gen, (rev, 0), True)
                            for s in self.shards
                            if shard_resource(s) == res.name and s not in last
                        }
                        if untouched:
                            t.control.write_fences(t.gen_rev, untouched)
                    if self.clock() >= next_look or res is not None:
                        records = t.control.read()
                        if not self._write_canaries(t, complete(records, t.pair, self.waiting)):
                            snap.fail("the lease of its cached keys ended")
                except RetryableError as exc:
                    snap.fail(f"closing {res.name if res else 'a resource'} failed: {exc}")
            if self.clock() >= next_look:
                next_look = self.clock() + every
            return True

        return listed

    def _write_canaries(self, t: Target, names: list[str]) -> bool:
        """Write the canaries of resources now complete in the target; False if the lease
        they go on had ended, or the generation moved (the target is then owed a resync)."""
        for name in names:
            try:
                key = canary_key(self.source.name, RESOURCE_BY_NAME[name])
                lease = t.control.leases.take([key], [], t.pair.gen, t.pair.chain)
                written = t.control.write_canary(RESOURCE_BY_NAME[name], t.gen_rev, lease)
            except LeaseGoneError as exc:
                t.owe(Cause.LEASE_EXPIRED, str(exc))
                return False
            if not written:
                t.owe(Cause.GENERATION_MOVED, "the generation moved before a canary was written")
                return False
            t.pair.canaried.add(name)
            log.info("%s→%s: %s synced (canary written)", self.source.name, t.name, name)
        return True

    def _snapshot_publisher(self, t: Target) -> Callable[[list[Batch]], None]:
        def publish(batches: list[Batch]) -> None:
            batches = self._on_leases(t, batches)
            while batches:
                # a snapshot is every key that differs, for every target: into a queue
                # without room it would fill Redis, so it waits for the workers instead
                self._wait_for_room(t)
                try:
                    self.publisher.publish(batches, budget=self._room())
                    sent = len(batches)
                except QueueFullError as exc:
                    sent = exc.published
                self._count_published(t, batches[:sent])
                batches = batches[sent:]

        return publish

    def _wait_for_room(self, t: Target) -> None:
        """Return once the source queue holds fewer than sync.max_queue_depth tasks and
        less than sync.max_queue_bytes of this watcher's, looking at its length every
        _DEPTH_EVERY seconds; raise RetryableError if the watcher stops or loses its lease
        meanwhile (the target then stays owed its resync). The wait beats the loop's heart:
        waiting for the workers is no hang."""
        waited = False
        while True:
            # a fresh look each time (a publish of a snapshot is tens of batches): the
            # tasks published since a look count in the bytes, but not in the depth
            depth = self._depth(self.clock(), 0.0)
            if not self._at_bound(depth):
                return
            if not waited:
                waited = True
                self.metrics.publish_paused.labels(self.source.name, "queue_full").inc()
                now = self.clock()
                if now >= self._room_logged + 10.0:  # a large snapshot waits many times
                    self._room_logged = now
                    log.warning(
                        "%s→%s: the snapshot waits for the workers: the queue holds %d tasks, "
                        "%d bytes of them",
                        self.source.name,
                        t.name,
                        depth,
                        self.publisher.queued_bytes(),
                    )
            self._beat = self.clock()
            if self._room_wait(_DEPTH_EVERY) or self._lease_lost.is_set():
                raise RetryableError("the snapshot stopped waiting for room in the queue")

    def _restart_all(self, cause: Cause, detail: str) -> None:
        """The source lost the history the feed watched: resync every target, watch anew."""
        log.warning("%s: resyncing every target (%s: %s)", self.source.name, cause.value, detail)
        self.feed.stop()
        self.buffer.drain()
        self._flush_deadline = self._held_since = None
        while not self.stop_event.is_set() and self._keep_lease():
            try:
                self.feed.cluster_id = self.feed.etcd.header()[1]
                for t in self.targets:
                    t.need_resync, t.resync_detail = cause, detail
                # those whose last read failed, or is still under way, are left to the
                # ticks (which read them first), unless no other target is left
                answering = [t for t in self.targets if not t.silent]
                rev = self._resync(answering or list(self.targets))
                self.feed.start(rev + 1)
                return
            except RetryableError as exc:
                log.warning("%s: resync after %s failed: %s", self.source.name, cause, exc)
                self.stop_event.wait(1.0)
