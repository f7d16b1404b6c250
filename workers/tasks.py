"""The Celery task that applies a batch. Thin: decode, call the applier, own the retry policy.

Outcomes are counted in Prometheus (workers/metrics.py, served on `[metrics] worker_port`),
and per (source, target) in a Redis hash beside the queues, so that every worker on every
machine adds to one set of counters that `kvmesh status` reads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from pipeline.clients.broker import Broker
from pipeline.clients.celeryapp import (
    budget_refusal_lines,
    create_app,
    keep_redis_clients,
    on_worker_lifecycle,
    restrict_remote_control,
)
from pipeline.clients.etcd import Etcd
from pipeline.clients.metrics_http import exposition, serve
from pipeline.config import WRITE, Settings
from pipeline.heap import settle_heap
from pipeline.protocol.errors import (
    ForbiddenBatchError,
    MalformedBatchError,
    PayloadGoneError,
    RefusedError,
    RetryableError,
    TimedOutError,
    show_key,
)
from pipeline.protocol.fence import Decision, FenceRecord, decide
from pipeline.protocol.layout import may_write, parse_shard
from pipeline.protocol.logs import LineBudget
from pipeline.protocol.names import TASK_NAME, is_payload_key, queue_name
from pipeline.protocol.wire import (
    Batch,
    Operation,
    Signer,
    Task,
    decode_task,
    decode_task_text,
    encode_task,
)
from workers.metrics import Exporter, TimedStore, WorkerMetrics
from workers.store import EtcdTargetStore, FenceView, TargetStore

from .applier import MAX_GROUP_BYTES, MAX_GROUP_OPS, apply_batch, apply_group

log = logging.getLogger("kvmesh.worker")

# The largest payload a worker reads for a task published by reference. A task is at most
# MAX_BATCHES_PER_TASK (64) batches of up to sync.max_batch_bytes (1 MB by default, at most
# pipeline.config.MAX_BATCH_BYTES) each, base64 in JSON: about 128 MB at the very most, a
# few hundred KB in practice.
MAX_PAYLOAD_BYTES = 128 << 20
# Seconds a routine outcome waits before it goes to the Redis counters (see flush): one
# round trip per task was about 12% of a worker's CPU at 200 tasks/s (docs/performance-log.md).
# `kvmesh status` is normally this much behind at most; a pool process that is killed
# loses what it had not sent.
COUNT_DELAY = 0.25
# What every healthy task records. Any other outcome (a duplicate, a retry, a rejection...)
# is the exception an operator looks for: a task that records one sends at once.
ROUTINE_OUTCOMES = frozenset({"applied", "grouped", "ops_applied"})
# Task messages refused before anything is applied (malformed, unsigned, forged: anyone who
# can write to Redis can send them) are logged a line each up to this many lines a minute
# for each reason in each process; the rest are said in one line once that minute is over
# (every one is counted in kvmesh_worker_tasks_rejected_total)
_REJECT_LINES = 100


class _PerProcess:
    """Connections made lazily in the process that uses them: gRPC channels and sockets do
    not survive a fork, and prefork workers fork after the app is built."""

    # held while a process takes over the state (_check_pid); a child of a fork gets a new
    # one (register_at_fork below): another thread may have held the parent's as it forked
    _pid_lock = threading.Lock()

    def __init__(self, settings: Settings, signer: Signer | None) -> None:
        self._settings = settings
        self._signer = signer
        self.gaps = GapClock()
        self._pid = -1
        self._stores: dict[str, TimedStore] = {}
        self._gens: dict[str, dict[str, FenceView]] = {}
        self._broker: Broker | None = None
        self._metrics: WorkerMetrics | None = None
        # the outcomes recorded for Redis and not sent yet, with when they are due (see
        # flush); a thread pool's slots share them, and a thread of the process sends them
        # once due if no task ends to carry them
        self.count_delay = COUNT_DELAY
        self._counts = threading.Condition()
        self._unsent: dict[tuple[str, str], Counter[str]] = {}  # added up per pair
        self._drops: list[str] = []  # payloads of tasks that ended, to delete with them
        self._due: float | None = None
        self._urgent = False  # an outcome other than ROUTINE_OUTCOMES is among them
        self._sender: threading.Thread | None = None
        self.refusals = RefusalLines()
        # when a call of this process to each target last timed out (monotonic): timed_out_at
        self._timed_out: dict[str, float] = {}
        # under the stall timeout: a batch handed back for a pause must come back before a
        # successor waiting on it gives up and asks for a resync
        self.target_pause = min(settings.sync.etcd_timeout, settings.sync.stall_timeout / 4)

    def _check_pid(self) -> None:
        """Start afresh in a process that is not the one that made this state (a fork's
        child), once: the slots of a thread pool that all begin their first task at once
        wait for the one that does it, and none of them uses the state half made."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._pid_lock:
            if self._pid != pid:
                self._reset()
                self._pid = pid  # last: whoever sees it finds everything made

    def _reset(self) -> None:
        self._stores = {}
        self._counts = threading.Condition()  # a fork copies no thread, and no waiter
        self._unsent, self._due, self._urgent, self._sender = {}, None, False, None
        self._drops = []
        self._gens = {}
        self._timed_out = {}
        self._broker = None
        self.refusals = RefusalLines()  # a fork copies no thread, and no holder of a lock

    @property
    def metrics(self) -> WorkerMetrics:
        """Made at first use: after the main process chose the metrics' mode (Exporter)."""
        if self._metrics is None:
            self._metrics = WorkerMetrics()
        return self._metrics

    def store(self, target: str) -> TimedStore:
        self._check_pid()
        store = self._stores.get(target)
        if store is None:
            cluster = self._settings.cluster(target)
            etcd = EtcdTargetStore(
                Etcd(cluster, self._settings.sync.etcd_timeout, WRITE), self._signer
            )
            store = TimedStore(etcd, self.metrics, target)
            self._stores[target] = store
        return store

    def gap_wait(self, target: str) -> float:
        """How long a batch waits in place for its predecessor while no fence it waits on
        moves: worker.gap_wait, or longer when the target's transactions are slow."""
        s = self._settings
        # a slow or stalling target must not hold a slot past the task's own bounds: a
        # quarter of the visibility timeout (then Redis hands the task to another worker)
        # and half the stall timeout (then the watcher resyncs)
        cap = min(s.broker.visibility_timeout / 4, s.sync.stall_timeout / 2)
        return gap_window(s.worker.gap_wait, self.store(target).txn_seconds, cap)

    def timed_out_at(self, target: str) -> float:
        """When a call of this process to *target* last timed out (monotonic; 0: not since
        it last answered). A target that drops packets makes each call wait
        sync.etcd_timeout: for target_pause after such a timeout a task gives its batches
        for the target back at once (see paused), and until it answers again it comes
        after the task's other targets."""
        self._check_pid()
        return self._timed_out.get(target, 0.0)

    def timed_out(self, target: str, now: bool) -> None:
        """A call to *target* timed out (*now* True), or it answered, even with an error."""
        self._check_pid()
        if now:
            self._timed_out[target] = time.monotonic()
        else:
            self._timed_out.pop(target, None)

    def paused(self, target: str) -> float:
        """The seconds left of *target*'s pause (0: not paused)."""
        since = self.timed_out_at(target)
        return max(0.0, since + self.target_pause - time.monotonic()) if since else 0.0

    def gens(self, target: str) -> dict[str, FenceView]:
        """Each source's generation as this process last saw it in *target*."""
        self._check_pid()
        return self._gens.setdefault(target, {})

    @property
    def broker(self) -> Broker:
        self._check_pid()
        if self._broker is None:
            self._broker = Broker.of(self._settings)
        return self._broker

    def claim(self, ref: str) -> bytes:
        """The JSON text of the payload a task names by reference (*ref*, a name
        is_payload_key accepts: nothing else in Redis is ever read for a task).
        MalformedBatchError if it is too large, PayloadGoneError if it is no longer there,
        RetryableError if Redis does not answer or refuses. The payload is verified like
        any other afterwards (decode_task_text)."""
        raw = self.broker.payload(ref, MAX_PAYLOAD_BYTES)
        if raw is None:
            raise PayloadGoneError("its payload is no longer in Redis")
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise MalformedBatchError(f"its payload is over {MAX_PAYLOAD_BYTES} bytes")
        return raw

    def may_log_refused(self, reason: str) -> bool:
        """Whether a task refused for *reason* may have its line in the log now (see
        _REJECT_LINES; *reason* is one of the error kinds, a fixed few)."""
        self._check_pid()
        return self.refusals.take(reason)

    def end_process(self) -> None:
        """What a process does as it ends: say the refused tasks' lines held back, and send
        the outcomes not sent yet (of this process: never a parent's before a fork)."""
        self._check_pid()
        self.refusals.say(every=True)
        self.send_counts()

    def count(self, source: str, target: str, outcome: str) -> None:
        self.record(source, target, Counter({outcome: 1}))

    def record(self, source: str, target: str, outcomes: Counter[str]) -> None:
        """Count *outcomes* in the metrics now, and in Redis within count_delay seconds."""
        self._check_pid()
        if source == "-":
            for reason, n in outcomes.items():
                self.metrics.rejected_tasks.labels(reason).inc(n)
        else:
            self.metrics.record(source, target, outcomes)
        with self._counts:
            self._unsent.setdefault((source, target), Counter()).update(outcomes)
            self._urgent = self._urgent or any(
                n and k not in ROUTINE_OUTCOMES for k, n in outcomes.items()
            )
            self._fall_due()

    def _fall_due(self) -> None:
        """What waits to be sent falls due in count_delay seconds, unless it already has
        a time; the sender thread is started if there is none. Holding self._counts."""
        if self._due is None:
            self._due = time.monotonic() + self.count_delay
            self._counts.notify()
        if self._sender is None:
            sender = threading.Thread(target=self._send_when_due, name="kvmesh-counts", daemon=True)
            sender.start()
            self._sender = sender

    def flush(self, drop: str | None = None) -> None:
        """What a task does as it ends; *drop* is the payload it came by reference, to be
        deleted now that the task is done with it. With an outcome other than
        ROUTINE_OUTCOMES among those recorded, send everything waiting (outcomes and
        payloads) in one round trip. Otherwise only once it is due, else the next task or
        the sender thread sends it: healthy tasks one after another cost one round trip to
        Redis per count_delay, not one each (a payload outlives its task by that much at
        most, unless the process is killed first: then its expiry takes it). Never raises:
        counters must not fail a batch, and a payload left behind expires (it runs in a
        finally: an exception here would hide the task's own)."""
        self._check_pid()
        with self._counts:
            if drop is not None:
                self._drops.append(drop)
                self._fall_due()
            if not self._urgent and (self._due is None or time.monotonic() < self._due):
                return
        self.send_counts()

    def send_counts(self) -> None:
        """Send every outcome recorded and not sent yet, and delete the payloads of the
        tasks that ended, now: at the end of a pool process too. Never raises."""
        self._check_pid()  # never what a parent process recorded before a fork
        with self._counts:
            unsent, self._unsent, self._due, self._urgent = self._unsent, {}, None, False
            drops, self._drops = self._drops, []
        if not unsent and not drops:
            return
        try:
            self.broker.add_stats([(s, t, c) for (s, t), c in unsent.items()], drops)
        except Exception as exc:  # Redis, or making its client
            # the payloads are not tried again: their expiry takes them
            left = f" (payloads left to expire: {len(drops)})" if drops else ""
            log.warning(
                "cannot record outcomes %s%s: %s",
                {f"{s}→{t}": dict(c) for (s, t), c in unsent.items()},
                left,
                exc,
            )
            self._broker = None

    def _send_when_due(self) -> None:
        """The sender thread: sends the outcomes once due, if no task ending did first."""
        counts = self._counts
        while True:
            with counts:
                while self._due is None or time.monotonic() < self._due:
                    counts.wait(None if self._due is None else self._due - time.monotonic())
            self.send_counts()


os.register_at_fork(after_in_child=lambda: setattr(_PerProcess, "_pid_lock", threading.Lock()))


class RefusalLines:
    """The log budget of the task messages one process refuses (_REJECT_LINES a minute for
    each reason): the rest of a minute's are said in one line per reason once that minute
    is over, by a thread of the process started at the first line held back (it looks four
    times a minute), and when the process ends (say(every=True))."""

    def __init__(
        self,
        lines: int = _REJECT_LINES,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._budget = LineBudget(lines, window, clock)
        self._lock = threading.Lock()  # a thread pool's slots share the budget
        self._sayer: threading.Thread | None = None
        self._closed = threading.Event()

    def take(self, reason: str) -> bool:
        """Whether one more line of *reason* may be logged now (if not, it is held back)."""
        with self._lock:
            if self._budget.take(reason):
                return True
            if self._sayer is None:
                self._sayer = threading.Thread(
                    target=self._say_when_due, name="kvmesh-refusals", daemon=True
                )
                self._sayer.start()
            return False

    def say(self, every: bool = False) -> None:
        """One line for each reason whose minute is over (with *every*: or not) and held
        lines back. Never raises."""
        with self._lock:
            over = self._budget.overdue(every)
        window = self._budget.window
        for reason, held, seconds in over:
            log.error(
                "%d more tasks rejected as %s in the last %.0fs, counted in "
                "kvmesh_worker_tasks_rejected_total and not logged one by one (%d lines a "
                "minute of each reason are)",
                held,
                reason,
                min(seconds, window),  # said up to a quarter of a window late
                self._budget.lines,
            )

    def close(self) -> None:
        """Stop the thread that says the held-back lines (what is held stays unsaid)."""
        self._closed.set()

    def _say_when_due(self) -> None:
        while not self._closed.wait(self._budget.window / 4):
            self.say()


def check_task(task: Task, sources: set[str], targets: set[str]) -> None:
    """What a task may touch, whatever its signature says: raise ForbiddenBatchError unless
    each batch's target is a configured target, its source a configured source other than
    that target, and every key of every batch inside that source's cache of its shard's
    resource (or that source's cluster config)."""
    for b in task.batches:
        if b.target not in targets:
            raise ForbiddenBatchError(f"target {b.target[:64]!r} is not a configured target")
        if b.source not in sources or b.source == b.target:
            raise ForbiddenBatchError(f"source {b.source[:64]!r} may not write {b.target[:64]}")
    for b in task.batches:
        parsed = parse_shard(b.shard)
        if parsed is None:
            raise ForbiddenBatchError(f"shard {b.shard[:64]!r} is not a kvmesh shard")
        resource, _ = parsed
        for op in b.ops:
            if not may_write(b.source, resource, op.key):
                raise ForbiddenBatchError(
                    f"key {show_key(op.key)} is outside {b.source}'s {resource.name} cache"
                )


def register_tasks(app: Any, settings: Settings) -> Any:
    """Register the apply task on *app*; returns the task."""
    settings.require_signing("the worker")
    signer = Signer(settings.signing) if settings.signing else None
    conns = _PerProcess(settings, signer)
    sources = {c.name for c in settings.sources}
    targets = {c.name for c in settings.targets}
    worker = settings.worker

    def backoff(retries: object) -> float:
        """The wait before a task's retry after *retries* retries: doubling from 0.2 s, at
        most worker.max_retry_delay. *retries* comes from the message's headers, which no
        signature covers: anything but a positive count counts as none."""
        n = retries if isinstance(retries, int) and retries > 0 else 0
        return min(worker.max_retry_delay, 0.2 * (1 << min(n, 10)))

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )
    def apply_task(self: Any, *args: Any, **extra: Any) -> str:
        task_id = show_key(str(self.request.id).encode(), 64)
        ref = None  # the payload of a task published by reference: deleted when it ends
        try:
            try:
                if len(args) != 1 or extra:
                    raise MalformedBatchError(
                        f"expected one payload argument, got {len(args)} and {len(extra)} more"
                    )
                payload = args[0]
                if isinstance(payload, dict) and payload.keys() == {"ref"}:
                    # published by reference (a claim check): the payload is in Redis
                    if not is_payload_key(payload["ref"]):
                        raise MalformedBatchError("field 'ref' does not name a task payload")
                    ref = payload["ref"]
                    task = decode_task_text(conns.claim(ref), signer)  # verifies it first
                else:
                    task = decode_task(payload, signer)  # verifies the signature first
            except MalformedBatchError as exc:
                if conns.may_log_refused(exc.kind):
                    log.error("rejected task %s: %s: %s", task_id, exc.kind, exc.reason)
                conns.count("-", "-", exc.kind)
                return exc.kind
            except RetryableError as exc:  # Redis did not answer or refused
                # the payload stays (if Redis cannot take the retry either, Celery drops
                # the message: its batches are then missing, and the pair recovers as from
                # any lost task)
                ref = None
                log.warning("task %s: %s; retrying", task_id, exc)
                raise self.retry(countdown=backoff(self.request.retries)) from None
            return _apply(self, task_id, task)
        finally:
            # the payload is deleted whatever happened (a retry carries its batches itself),
            # with the outcomes: at once if one is unusual, else once they are due. A copy
            # of this task delivered again after that finds the payload gone, counts it and
            # stops; before, it finds its batches landed (the fences)
            conns.flush(drop=ref)

    def _apply(self: Any, task_id: str, task: Task) -> str:
        first = task.batches[0]
        by_target: dict[str, list[Batch]] = {}
        for b in task.batches:
            by_target.setdefault(b.target, []).append(b)
        for target in list(by_target):
            # each target's batches on their own: one this worker may not write (a target
            # its config does not know yet, say) costs only that target's batches
            try:
                check_task(Task(by_target[target]), sources, targets)
            except ForbiddenBatchError as exc:
                # signed, so the pair it names is who signed it: count it there
                log.error(
                    "rejected batches of task %s for %s→%s: %s: %s",
                    task_id,
                    show_key(first.source.encode(), 64),
                    show_key(target.encode(), 64),
                    exc.kind,
                    exc.reason,
                )
                conns.count(first.source, target, exc.kind)
                conns.metrics.failed(by_target[target])
                del by_target[target]
        if not by_target:
            return "forbidden"
        outcomes: dict[str, Counter[str]] = {t: Counter() for t in by_target}
        gaps: dict[tuple[str, str, str], object] = {}
        unavailable: list[Batch] = []
        waiting: list[Batch] = []
        waits = {t: conns.gap_wait(t) for t in by_target}
        give_up = time.monotonic() + min(
            MAX_WAIT_GAPS * max(waits.values()), settings.broker.visibility_timeout / 4
        )
        delay_unavailable = backoff(self.request.retries)
        # a target whose calls timed out lately comes last, so that the others' batches land
        # first, and for a while after such a timeout its batches go back without a call
        for target in sorted(by_target, key=conns.timed_out_at):
            batches = by_target[target]
            left = conns.paused(target)
            if left:
                outcomes[target]["retry_paused"] += 1
                conns.metrics.failed(batches)
                unavailable += batches
                # back when the pause is over, not sooner: to this process, or another
                delay_unavailable = max(delay_unavailable, left)
                continue
            try:
                waiting += apply_all(
                    conns.store(target),
                    batches,
                    outcomes[target],
                    waits[target],
                    gaps,
                    (settings.sync.max_batch_ops + 1, settings.sync.max_batch_bytes),
                    conns.metrics.applied,
                    give_up,
                    gens=conns.gens(target),
                )
                conns.timed_out(target, now=False)
            except _Unavailable as exc:
                # the other targets of the task go on; this one's batches come back later
                refused = isinstance(exc.cause, RefusedError)
                timed_out = isinstance(exc.cause, TimedOutError)
                conns.timed_out(target, now=timed_out)
                log.log(
                    logging.ERROR if refused else logging.WARNING,
                    "%s→%s: %s; retrying %d batches%s",
                    first.source,
                    target,
                    exc.cause,
                    len(exc.remaining),
                    f"; no call to it from this process for {conns.target_pause:g}s"
                    if timed_out
                    else "",
                )
                outcomes[target]["retry_refused" if refused else "retry_unavailable"] += 1
                conns.metrics.failed(exc.remaining)
                unavailable += exc.remaining
        retry: list[Batch] = []
        delay = 0.0
        since_ms: int | None = task.gap_since_ms
        if waiting:
            now_ms = int(time.time() * 1000)
            since_ms = since_ms or now_ms
            mono = time.monotonic()
            stuck = max(
                conns.gaps.stuck_for(k, gaps.get(k), mono)
                for k in {(b.source, b.target, b.shard) for b in waiting}
            )
            waited = max((now_ms - since_ms) / 1000, stuck)
            if waited < settings.sync.stall_timeout:
                for b in waiting:
                    outcomes[b.target]["gap_wait"] += 1
                retry += waiting
                # the longer a gap lasts, the less often each waiting task comes back: many
                # of them behind one lost batch must not keep the pool busy
                delay = min(max(worker.gap_retry_delay, waited / 4), 2.0)
            else:
                for target in {b.target for b in waiting}:
                    stalled = [b for b in waiting if b.target == target]
                    _resync(
                        conns,
                        stalled[0],
                        f"shard {stalled[0].shard} stalled before {stalled[0].prev}",
                    )
                    outcomes[target]["stalled"] += len(stalled)
                    conns.metrics.failed(stalled)
        for target, counts in outcomes.items():
            if counts[Decision.RESYNC.value]:
                _resync(conns, by_target[target][0], "target lost its generation or fence")
            conns.record(first.source, target, counts)
        if unavailable and retry:
            # two clocks: the unreachable target's batches back off on their own, so that a
            # healthy target's batches waiting on a gap are not held back with them
            self.apply_async(
                args=(encode_task(unavailable, signer),),
                kwargs={},
                countdown=delay_unavailable,
                queue=queue_name(first.source),
                routing_key=queue_name(first.source),
            )
        elif unavailable:
            retry, delay, since_ms = unavailable, delay_unavailable, task.gap_since_ms
        if retry:
            raise self.retry(
                args=(encode_task(retry, signer, since_ms),), kwargs={}, countdown=delay
            )
        total: Counter[str] = sum(outcomes.values(), Counter())
        return " ".join(f"{k}={v}" for k, v in sorted(total.items()) if k != "ops_applied")

    apply_task.conns = conns  # the worker's metrics and connections (create_worker_app)
    return apply_task


# A predecessor's task applies its transactions one after another, and the fence of a
# batch's shard may stand still that long while the task works on its other shards. A task
# of full batches holds 4 transactions for a target (MAX_OPS_PER_TASK, up to MAX_GROUP_OPS to
# a transaction); 8 leaves room for the batches of other targets before them in a task, and
# for tasks of watchers of the version before 5305c83 (1,024 operations). Waiting less, on a
# loaded target, hands back a batch whose predecessor was about to land, and its own
# successors then wait for it in turn.
TXNS_PER_TASK = 8


def gap_window(gap_wait: float, txn_seconds: float, cap: float) -> float:
    """The wait without a moving fence before a batch goes back to the queue: gap_wait,
    or as long as a predecessor's task of TXNS_PER_TASK transactions takes, if longer, but
    never over *cap* (nor under gap_wait)."""
    return max(gap_wait, min(TXNS_PER_TASK * txn_seconds, cap))


# A task waits while the chain it waits on moves for at most this many gap_waits in all,
# and never more than a quarter of broker.visibility_timeout (after which Redis would hand
# the task, still unacknowledged, to a second worker)
MAX_WAIT_GAPS = 20


class _Unavailable(Exception):
    def __init__(self, cause: RetryableError, remaining: list[Batch]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.remaining = remaining


class GapClock:
    """How long each shard's fence has stood still, as this process saw it while batches
    waited on it. A task that waits is handed back to the queue; when many wait behind one
    lost batch they take turns, and a clock kept by each task alone would only run while
    that task is in hand. Counted per fence state, this one sees a stuck fence after
    sync.stall_timeout however long the queue."""

    def __init__(self, limit: int = 10_000) -> None:
        self._first: dict[tuple[str, str, str], tuple[object, float]] = {}
        self._limit = limit

    def stuck_for(self, key: tuple[str, str, str], state: object, now: float) -> float:
        first = self._first.get(key)
        if first is None or first[0] != state:
            if len(self._first) >= self._limit:
                self._first.clear()  # old entries only: a stuck fence is seen again at once
            self._first[key] = (state, now)
            return 0.0
        return now - first[1]


def apply_all(
    store: TargetStore,
    batches: list[Batch],
    outcomes: Counter[str],
    gap_wait: float,
    gaps: dict[tuple[str, str, str], object] | None = None,
    group: tuple[int, int] = (MAX_GROUP_OPS, MAX_GROUP_BYTES),
    on_applied: Callable[[Batch], None] | None = None,
    give_up: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    gens: dict[str, FenceView] | None = None,
) -> list[Batch]:
    """Apply every batch it can, in passes: a batch whose predecessor is missing is tried
    again after the others, since another worker is usually applying that predecessor right
    now. Returns the batches still waiting after *gap_wait* seconds without progress (its
    own, or a fence it waits on moving: the predecessor's chain is being applied by another
    worker, and re-queueing would only cost a round trip through the broker; until
    *give_up*, a time.monotonic() deadline the task sets for all its targets, by default
    20 times *gap_wait* from now); for each, *gaps* gets the fence it waited on.
    *on_applied* is told of each batch that landed, after its transaction. *clock* and
    *sleep* are the monotonic clock and its sleep (the tests pass a fake one). *gens* holds
    each source's generation as this process last saw it in this target (apply_group: with
    it, a batch next in its chain lands without a read of its fence)."""
    pending = list(batches)
    deadline = clock() + gap_wait
    if give_up is None:
        give_up = clock() + MAX_WAIT_GAPS * gap_wait
    watched: dict[str, object] = {}  # the fence each waiting batch's shard had, last look

    def moved(shard: str, fence: object) -> bool:
        before = watched.get(shard, fence)
        watched[shard] = fence
        return before != fence

    def reject(op: Operation, reason: str) -> None:
        outcomes["rejected_too_large"] += 1
        log.error(
            "%s→%s: not synced: key %s: %s",
            pending[0].source,
            pending[0].target,
            show_key(op.key),
            reason,
        )

    delay = 0.002
    known: dict[str, FenceView] = {}  # the fences as this task read or wrote them
    looked: set[str] = set()  # the shards whose fences this task read: never guessed again
    while pending:
        # one read of every fence and one transaction for what they admit; a batch the
        # read showed waiting for its predecessor (usually in another worker's hands right
        # now) waits without a read of its own, and tries again with the others
        deferred: list[tuple[Batch, FenceRecord | None]] = []
        try:
            together, rest = apply_group(
                store,
                pending,
                *group,
                deferred=deferred,
                known=known,
                gens=gens,
                looked=looked,
            )
        except RetryableError as exc:
            raise _Unavailable(exc, pending) from None
        if together:
            if on_applied is not None:
                for b in together:
                    on_applied(b)
            outcomes[Decision.APPLY.value] += len(together)
            outcomes["ops_applied"] += sum(len(b.ops) for b in together)
            outcomes["grouped"] += len(together)
        waiting = [b for b, _ in deferred]
        others = [b for b in rest if not any(b is w for w in waiting)]
        if gaps is not None:
            for b, fence in deferred:
                gaps[(b.source, b.target, b.shard)] = fence
        progress = bool(together)
        advancing = False
        for b, fence in deferred:
            advancing = moved(b.shard, fence) or advancing
        for i, batch in enumerate(others):
            # everything else (duplicates, stale batches, races, sizes, leases, resyncs)
            # is the one-batch path's

            def on_gap(seen: FenceView, b: Batch = batch) -> None:
                nonlocal advancing
                if gaps is not None:
                    gaps[(b.source, b.target, b.shard)] = seen.fence
                advancing = moved(b.shard, seen.fence) or advancing

            try:
                decision = apply_batch(store, batch, on_reject=reject, on_gap=on_gap)
            except RetryableError as exc:
                raise _Unavailable(exc, waiting + others[i:]) from None
            if decision is Decision.GAP:
                waiting.append(batch)
                continue
            progress = True
            outcomes[decision.value] += 1
            if decision is Decision.APPLY:
                outcomes["ops_applied"] += len(batch.ops)
                if on_applied is not None:
                    on_applied(batch)
        if others:
            known.clear()  # the one-batch path wrote or found what the views do not know
        ours = {b.pos: b.shard for b in waiting}  # what this task will still write
        for b in waiting:
            v = known.get(b.shard)
            if (
                v is not None
                and ours.get(b.prev) != b.shard
                and decide(b.gen, b.prev, b.pos, v.gen, v.fence) is Decision.GAP
            ):
                # another worker holds its predecessor and is about to move that fence:
                # read it anew
                del known[b.shard]
        now = clock()
        if progress:
            deadline = now + gap_wait  # progress: wait afresh
            delay = 0.002
            watched.clear()  # what it saw before its own commit is no news of others
        else:
            if advancing and now < give_up:
                deadline = now + gap_wait  # another worker is moving the chain towards us
            elif now >= deadline:
                return waiting
            sleep(delay)  # the predecessor is being applied elsewhere: a moment
            delay = min(delay * 2, 0.05 if not advancing else 0.02)
        pending = sorted(waiting, key=batches.index)
    return []


def _resync(conns: _PerProcess, batch: Batch, reason: str) -> None:
    log.warning("%s→%s: asking the watcher for a resync: %s", batch.source, batch.target, reason)
    try:
        conns.store(batch.target).request_resync(batch.source, batch.gen, reason)
    except RetryableError as exc:  # the watcher's own stall detection covers this case
        log.warning("cannot write the resync request: %s", exc)


# Remote-control commands a worker answers. Whoever can write to Redis can send any of
# Celery's commands; those that change what a worker does (shutdown, revoke, rate and time
# limits, pool size, consumers) would let them stop syncing quietly, so a kvmesh worker only
# answers the ones that read its state (Flower's views and `celery inspect` keep working).
# Not `hello` either: it reads, but it also merges the sender's list of revoked task IDs
# into the worker's (what mingle uses it for, which kvmesh workers run without), and a
# revoked ID is a task dropped unread, its retries too.
READ_ONLY_CONTROL = frozenset(
    {
        "active",
        "active_queues",
        "clock",
        "dump_active",
        "dump_reserved",
        "dump_revoked",
        "dump_schedule",
        "dump_tasks",
        "ping",
        "query_task",
        "registered",
        "report",
        "reserved",
        "revoked",
        "scheduled",
        "stats",
        "heartbeat",
        # not enable_events: Flower broadcasts it every few seconds, which would turn on the
        # task events worker.task_events keeps off (a Redis publish per event)
        "disable_events",
    }
)


def create_worker_app(settings: Settings) -> Any:
    """The Celery app with the apply task registered: what a worker process runs."""
    keep_redis_clients()
    app = create_app(settings)
    # messages whose shape Celery's receiving code trips on are refused (GuardedConsumer)
    app.conf.worker_consumer = "pipeline.clients.celeryapp:GuardedConsumer"
    task = register_tasks(app, settings)
    restrict_remote_control(READ_ONLY_CONTROL)
    exporter = Exporter()
    port, bind = settings.metrics.worker_port, settings.metrics.bind
    server: list[ThreadingHTTPServer] = []
    main_pid = [os.getpid()]

    def init(concurrency: int) -> None:
        # in the worker's main process, before the pool forks (the pool processes inherit
        # the frozen heap): once the metrics are set up
        try:
            serve_metrics(concurrency)
        finally:
            settle_heap()

    def serve_metrics(concurrency: int) -> None:
        if not port:
            return
        main_pid[0] = os.getpid()
        exporter.enable_multiprocess()
        metrics = task.conns.metrics
        metrics.concurrency.set(concurrency)
        metrics.zero([c.name for c in settings.sources], [c.name for c in settings.targets])
        try:
            server.append(serve(port, bind, exposition(exporter.registry()), exporter.unready))
        except OSError as exc:
            log.error(
                "metrics.worker_port: cannot listen on %s:%d: %s; serving no metrics",
                bind,
                port,
                exc.strerror,
            )

    def ready() -> None:
        settle_heap()  # what the main process built since init (its consumer) too
        exporter.ready = True

    def process_started() -> None:
        # a forked pool process inherits the listening socket: drop it, so that a pool
        # process outliving a killed main process does not keep the port from the next
        # one (the solo pool sends this signal in the main process itself: keep it there)
        if os.getpid() != main_pid[0]:
            for s in server:
                s.socket.close()

    def process_ended(pid: int) -> None:
        task.conns.end_process()  # in the pool process that ends
        exporter.process_ended(pid)

    # Celery's own lines for the messages it refuses before any task runs: counted, cut
    # short, under the same budget (in the main process, which receives the messages)
    budget_refusal_lines(task.conns.may_log_refused, lambda kind: task.conns.count("-", "-", kind))
    on_worker_lifecycle(
        init=init,
        ready=ready,
        process_started=process_started,
        process_ended=process_ended,
        shutdown=task.conns.end_process,
    )
    return app
