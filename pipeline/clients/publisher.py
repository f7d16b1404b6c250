"""Publish batches as Celery tasks, by task name, on the source's queue."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import redis

from pipeline.protocol.errors import PublishError, QueueFullError, RetryableError
from pipeline.protocol.names import (
    CLAIM_CHECK_BYTES,
    PAYLOAD_TTL_SECONDS,
    TASK_NAME,
    UNACKED_INDEX,
    payload_key,
)
from pipeline.protocol.wire import Batch, Signer, encode_task_json

log = logging.getLogger("kvmesh.watcher")


class Publisher(Protocol):
    def publish(
        self,
        batches: Sequence[Batch],
        per_task: int = 0,
        txn_ops: int = 0,
        budget: int | None = None,
        track: bool = False,
    ) -> None:
        """Publish the batches, *per_task* to a task (0: sync.batches_per_task); *txn_ops*:
        see group_batches. With a *budget*, stop before a task once the tasks published by
        this call have cost the broker that many bytes (the first always goes), raising
        QueueFullError with the batches that went out. With *track*, follow the tasks
        until the workers are done with them (busy_shards)."""
        ...

    def backlog(self, among: Collection[str] = ()) -> int:
        """Tasks waiting in the queue (not counting those a worker holds). With *among*,
        also find which of those shards have a tracked task in a worker's hands."""
        ...

    def tracks(self, among: Collection[str]) -> bool:
        """Whether a look asking about *among* could find a busy shard (no call)."""
        ...

    def busy_shards(self) -> set[str]:
        """The shards, of those the last backlog() asked about, that have a tracked task a
        worker has taken and not yet acknowledged (for less than BUSY_FOR seconds, as far
        as the publisher saw)."""
        ...

    def queued_bytes(self) -> int:
        """What the tasks waiting in the queue at the last backlog() cost the broker, in
        bytes: the newest tasks this publisher wrote, as many as the queue held (an
        estimate: a task it did not write, a worker's retry say, stands for one of its
        own), and those it published since; 0 while the queue's length cannot be read."""
        ...


# A task carries at most this many operations, however many batches: a worker applies a
# task's batches one transaction after another, so a flush of many full batches must spread
# over several tasks (and workers), while many small batches (one per target) share one.
# 4 transactions of full batches: with 8 (1,024), a pool through a 10 ms round trip drained
# a backlog about a tenth slower, and its start (small flushes that chain) half again as
# slow (docs/performance-log.md).
MAX_OPS_PER_TASK = 512


def group_batches(
    batches: Sequence[Batch], per_task: int, max_ops: int = MAX_OPS_PER_TASK, txn_ops: int = 0
) -> list[list[Batch]]:
    """The batches in order, at most *per_task* and about *max_ops* operations to a task
    (a batch is never split; one larger than *max_ops* has a task of its own). A task may
    carry batches for several targets of its source (a flush of the watcher shares its tasks
    among all of them, not a task per target); the worker applies each in its own target's
    fenced transaction. Consecutive batches of one shard (a run) go into one task when they fit
    in a task of their own: split over two tasks, the second would wait for the first.

    *txn_ops* (the target's operations per transaction; 0: no such limit) keeps a task of
    several shards of one target to what one transaction holds (each shard's operations
    and its fence). The batches of several shards that one transaction cannot hold go to
    tasks of their own, which touch other shards and which the pool applies side by side,
    instead of one after another in one task. Each flush of a burst's start touches
    most shards, and the next flush's task follows it in all of them (docs/performance-log.md).
    The limit is counted per target. The watcher lists a flush target by target, so a
    target's share larger than one transaction goes to tasks of that target alone."""
    groups: list[list[Batch]] = []
    current: list[Batch] = []
    ops = 0
    # per target in the current task: its operations and its shards (one fence each)
    held: dict[str, tuple[int, int]] = {}
    for run in _runs(batches):
        if current and len(run) > 1:
            run_ops = sum(len(b.ops) for b in run)
            if len(current) + len(run) > per_task or ops + run_ops > max_ops:
                groups.append(current)
                current, ops, held = [], 0, {}
        if current and txn_ops and run[0].target in held:
            t_ops, t_shards = held[run[0].target]
            if t_ops + t_shards + len(run[0].ops) + 1 > txn_ops:
                groups.append(current)
                current, ops, held = [], 0, {}
        for i, b in enumerate(run):
            if current and (len(current) >= per_task or ops + len(b.ops) > max_ops):
                groups.append(current)
                current, ops, held = [], 0, {}
            t_ops, t_shards = held.get(b.target, (0, 0))
            # the run's first batch in this task brings its shard's fence
            held[b.target] = (t_ops + len(b.ops), t_shards + (i == 0 or not current))
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


# What a Celery task message says beside its arguments (Celery's protocol 2: the body is
# [args, kwargs, embed]), and the constant parts of its headers.
_EMBED_JSON = '{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'
_HEADERS: dict[str, Any] = {
    "lang": "py",
    "task": TASK_NAME,
    "shadow": None,
    "eta": None,
    "expires": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "parent_id": None,
    "kwargsrepr": "{}",
    "ignore_result": None,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}


def task_message(
    queue: str, payload_json: str, argsrepr: str, origin: str, tag: str | None = None
) -> str:
    """One message of TASK_NAME with one argument, the JSON text *payload_json*, as Celery 5
    (protocol 2) and kombu's Redis transport write it for `send_task(..., queue=queue)`,
    except that the body travels as JSON text instead of base64 of it (`body_encoding` says
    so in each message, and kombu reads either): no base64 on either side, and a quarter
    fewer bytes. The payload's text is put in the body as it is, not parsed and written
    out again. Workers are plain Celery workers and cannot tell the difference."""
    task_id = str(uuid.uuid4())
    return json.dumps(
        {
            "body": f"[[{payload_json}],{{}},{_EMBED_JSON}]",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                **_HEADERS,
                "id": task_id,
                "root_id": task_id,
                "argsrepr": argsrepr,
                "origin": origin,
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "utf-8",
                "delivery_tag": tag or str(uuid.uuid4()),
            },
        },
        separators=(",", ":"),
    )


# A tracked task counts as busy (in a worker's hands) for this long at most after its
# publisher first saw a worker hold it: a worker whose main process died mid-task leaves
# its tag in kombu's index until the visibility timeout gives the task back (a pool process
# lost is handed back at once), and a flush must not wait for that. Far longer than a task
# takes on a link of tens of milliseconds.
BUSY_FOR = 1.0
# Tracked tasks remembered at most (the oldest forgotten first), and how long one is
# remembered while no worker has taken it (queued behind others)
_TRACKED = 256
_QUEUED_FOR = 2.0

# The most tasks whose bytes a publisher remembers (more than sync.max_queue_depth holds by
# default): while the queue's length cannot be read they are not forgotten otherwise.
_REMEMBERED = 100_000


class RedisPublisher:
    """Publishes tasks by pushing Celery's message format onto the queue's Redis list, as
    kombu does, without Celery: a watcher never imports Celery or kombu (0.1 s of its start)
    and a task takes about 40% less time to publish than through `send_task`
    (docs/performance-log.md)."""

    def __init__(
        self,
        queue: str,
        client: redis.Redis,
        signer: Signer | None,
        batches_per_task: int = 8,
        on_task: Callable[[int, int], None] | None = None,
    ) -> None:
        self._queue = queue
        self._per_task = batches_per_task
        self._redis = client
        self._signer = signer
        # told, for each task published, the size of its payload and the bytes written to
        # Redis for it (the message as pushed, and the payload stored by reference)
        self._on_task = on_task
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        # the bytes written for each task published, the newest first, as long as the queue
        # may still hold it, and their sum: kombu's workers take the oldest task first, so a
        # queue of N tasks holds the N newest
        self._written: deque[int] = deque()
        self._queued = 0
        self._unread = False  # the last look at the queue's length failed
        # the tasks of tracked publishes (live flushes): delivery tag -> (their shards,
        # when published, when this publisher first saw a worker hold it or None (both
        # monotonic), whether a look found it in neither list), dropped once the worker is
        # done with it
        self._tracked: dict[str, tuple[frozenset[str], float, float | None, bool]] = {}
        self._busy: set[str] = set()  # what the last backlog() found (busy_shards)
        self._track = True  # off for good once Redis refuses to say (an old Redis, an ACL)
        self.clock = time.monotonic

    def backlog(self, among: Collection[str] = ()) -> int:
        """The length of the queue's list, one LLEN: every task a watcher publishes has
        priority 0, and kombu gives a task back (a worker lost) to the list of its priority,
        so the priority sub-queues that queue_depth adds up stay empty here. A watcher looks
        at its queue before most flushes; the ten LLENs of queue_depth cost it twice the
        CPU of one (docs/performance-log.md).

        With *among* (shards the caller has changes for), the same round trip also asks
        which tracked tasks of those shards a worker holds (busy_shards): ZMSCORE of their
        delivery tags in kombu's index of taken messages, pipelined with the LLEN. Without
        such a task, only the LLEN goes."""
        want = set(among)
        tags = self._relevant(want) if want else []
        try:
            if tags:
                pipe = self._redis.pipeline(transaction=False)
                pipe.llen(self._queue)
                pipe.zmscore(UNACKED_INDEX, tags)
                length, scores = pipe.execute(raise_on_error=False)
                if isinstance(length, Exception):
                    raise length
            else:
                length, scores = self._redis.llen(self._queue), None
            depth = int(length)
        except (redis.RedisError, ValueError, TypeError) as exc:
            # what the queue holds is unknown until it can be read again: no figure, so
            # that a queue whose length cannot be read (a broker user without LLEN, say)
            # never holds a pause for good, as the depth bound does not either
            self._unread = True
            self._busy = set()  # unknown: nothing waits for it
            raise RetryableError(f"reading the depth of {self._queue} failed: {exc}") from None
        self._unread = False
        while len(self._written) > depth:  # taken by workers
            self._queued -= self._written.pop()
        self._busy = self._held(tags, scores, depth) & want if tags else set()
        return depth

    def busy_shards(self) -> set[str]:
        return self._busy

    def _relevant(self, want: set[str]) -> list[str]:
        """The tracked tasks with a shard of *want*, once those no longer worth waiting
        for are forgotten."""
        now = self.clock()
        tags = []
        for tag, (shards, published, seen, _) in list(self._tracked.items()):
            if (now - seen >= BUSY_FOR) if seen is not None else (now - published > _QUEUED_FOR):
                # held too long to wait for (a worker whose main process died mid-task,
                # say: its tag stays in kombu's index until the visibility timeout), or
                # queued that long (a backlog, which the linger paces)
                del self._tracked[tag]
            elif not shards.isdisjoint(want):
                tags.append(tag)
        return tags

    def _held(self, tags: list[str], scores: object, depth: int) -> set[str]:
        """The shards of *tags* that a worker holds, by kombu's index (*scores*: ZMSCORE's
        reply, a score for each tag taken and not yet acknowledged); tasks done are
        forgotten. Advisory: a reply it cannot read says none."""
        if isinstance(scores, Exception):
            if isinstance(scores, redis.exceptions.NoPermissionError) or (
                "unknown command" in str(scores).lower()
            ):
                self._stop_tracking(scores)
            return set()
        if (
            not isinstance(scores, list)
            or len(scores) != len(tags)
            or not all(x is None or isinstance(x, float | int) for x in scores)
        ):
            return set()
        now = self.clock()
        busy: set[str] = set()
        for tag, score in zip(tags, scores, strict=True):
            shards, published, seen, missed = self._tracked[tag]
            if score is not None:  # taken, not yet acknowledged
                if seen is None:
                    self._tracked[tag] = (shards, published, now, False)
                busy |= shards
            elif seen is not None or (depth == 0 and missed):
                # acknowledged since it was seen taken, or in neither list at two looks:
                # done
                del self._tracked[tag]
            elif depth == 0:
                # in neither list: done, or taken by a worker that has not noted it yet
                # (kombu pops the message, then adds it to its index): the next look tells
                self._tracked[tag] = (shards, published, seen, True)
        return busy

    def tracks(self, among: Collection[str]) -> bool:
        """Whether a tracked task has one of the shards *among*: whether a look with them
        can find any busy (no call)."""
        return any(not shards.isdisjoint(among) for shards, *_ in self._tracked.values())

    def _stop_tracking(self, exc: Exception) -> None:
        """Redis refused to say which tasks a worker holds (ZMSCORE is Redis 6.2's; an ACL
        may leave it out): publish as if none were held, from now on."""
        if self._track:
            log.warning(
                "%s: cannot tell which of its tasks the workers hold (%s): flushes no "
                "longer wait for the workers to finish their shards' last tasks",
                self._queue,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )
        self._track = False
        self._tracked.clear()
        self._busy = set()

    def queued_bytes(self) -> int:
        """The bytes written for the tasks the queue held at the last backlog() (payloads
        by reference included): the newest this publisher published, as many as the queue
        held, and those it published since; 0 while its length cannot be read."""
        return 0 if self._unread else self._queued

    def publish(
        self,
        batches: Sequence[Batch],
        per_task: int = 0,
        txn_ops: int = 0,
        budget: int | None = None,
        track: bool = False,
    ) -> None:
        """Publish every batch, or raise PublishError saying how many went out first
        (QueueFullError once the tasks published have cost *budget* bytes). With *track*,
        each task's delivery tag and shards are remembered for busy_shards."""
        sent = spent = 0
        try:
            for group in group_batches(batches, per_task or self._per_task, txn_ops=txn_ops):
                if budget is not None and sent and spent >= budget:
                    raise QueueFullError(
                        f"{self._queue} holds as many bytes of tasks as it may", sent
                    )
                first = group[0]
                payload = encode_task_json(group, self._signer)
                targets = sorted({b.target for b in group})
                to = targets[0] if len(targets) == 1 else f"{len(targets)} targets"
                # what Flower shows for the task's arguments: what it is, not the payload
                argsrepr = (
                    f"[{first.source}->{to} {len(group)} batches "
                    f"{sum(len(b.ops) for b in group)} ops]"
                )
                # one push per task, no retry: the watcher pauses and keeps the changes on
                # any failure, and `sent` tells it which went out
                tag = str(uuid.uuid4())
                if len(payload) <= CLAIM_CHECK_BYTES:
                    message = task_message(self._queue, payload, argsrepr, self._origin, tag)
                    self._redis.lpush(self._queue, message)
                    written = len(message)
                else:
                    # a large payload waits in a string of its own and the message names
                    # it: the worker's main process, which takes and stores every message
                    # it hands out, then moves a few hundred bytes instead of the payload.
                    # Both or neither (MULTI): a message never names a payload not written.
                    ref = payload_key(uuid.uuid4().hex)
                    claim = f'{{"ref":"{ref}"}}'
                    message = task_message(self._queue, claim, argsrepr, self._origin, tag)
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.set(ref, payload, ex=PAYLOAD_TTL_SECONDS)
                    pipe.lpush(self._queue, message)
                    pipe.execute()
                    written = len(message) + len(payload)
                if track and self._track:
                    self._tracked[tag] = (
                        frozenset(b.shard for b in group),
                        self.clock(),
                        None,
                        False,
                    )
                    if len(self._tracked) > _TRACKED:
                        del self._tracked[next(iter(self._tracked))]
                sent += len(group)
                spent += written
                self._written.appendleft(written)
                self._queued += written
                if len(self._written) > _REMEMBERED:  # the queue's length went unread
                    self._queued -= self._written.pop()
                if self._on_task is not None:
                    self._on_task(len(payload), written)
        except (OSError, redis.RedisError) as exc:
            raise PublishError(f"publishing to {self._queue} failed: {exc}", sent) from None
