"""Apply one batch to one target under its shard's fence. Plain code around a TargetStore:
the Celery task only decodes the message and owns the retry policy."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence

from pipeline.protocol.errors import LeaseGoneError, RequestTooLargeError, show_key
from pipeline.protocol.fence import Decision, FenceRecord, decide
from pipeline.protocol.layout import Op, parse_shard
from pipeline.protocol.names import rejected_key
from pipeline.protocol.sharding import shard_of
from pipeline.protocol.wire import Batch, Operation
from workers.store import FenceView, Part, TargetStore

log = logging.getLogger("kvmesh.worker")

# A compare that fails means another writer moved the fence or the generation between our
# read and our write; decide again. Bounded so a livelock cannot pin a worker.
_MAX_RACES = 50


def apply_batch(
    store: TargetStore,
    batch: Batch,
    *,
    gap_wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_reject: Callable[[Operation, str], None] | None = None,
    on_gap: Callable[[FenceView], None] | None = None,
) -> Decision:
    """Apply *batch* if the fence admits it. Returns the decision taken.

    A batch whose predecessor has not landed is re-checked for up to *gap_wait* seconds
    (another worker usually holds the predecessor right now) before GAP is returned.
    """
    deadline = clock() + gap_wait
    delay = 0.002
    races = 0
    while True:
        seen = store.read_fence(batch.source, batch.shard)
        if seen.fence_corrupt:
            return Decision.RESYNC
        decision = decide(batch.gen, batch.prev, batch.pos, seen.gen, seen.fence)
        if decision is Decision.APPLY and not in_its_shard(batch, seen.shards):
            log.error(
                "%s→%s: rejected batch of shard %s: not a shard of this generation, or a key "
                "outside it",
                batch.source,
                batch.target,
                show_key(batch.shard.encode(), 64),
            )
            return Decision.FORBIDDEN
        if decision is Decision.APPLY:
            fence = FenceRecord(batch.gen, batch.pos, batch.done)
            try:
                try:
                    ok = store.commit(
                        batch.source, batch.shard, seen, batch.ops, fence, batch.lease
                    )
                except RequestTooLargeError:
                    ok = _commit_split(store, batch, seen, fence, on_reject)
            except LeaseGoneError:
                # its keys went with the lease: only a resync onto a new lease restores them
                return Decision.RESYNC
            if ok:
                return Decision.APPLY
            races += 1
            if races >= _MAX_RACES:
                return Decision.GAP
            continue
        if decision is Decision.GAP and clock() < deadline:
            sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        if decision is Decision.GAP and on_gap is not None:
            on_gap(seen)
        return decision


MAX_GROUP_OPS = 128  # etcd's --max-txn-ops: operations (and compares) per transaction
MAX_GROUP_BYTES = 1_000_000  # keys and values per group transaction (etcd takes 1.5 MiB)


def apply_group(
    store: TargetStore,
    batches: Sequence[Batch],
    max_ops: int = MAX_GROUP_OPS,
    max_bytes: int = MAX_GROUP_BYTES,
    deferred: list[tuple[Batch, FenceRecord | None]] | None = None,
    known: dict[str, FenceView] | None = None,
) -> tuple[list[Batch], list[Batch]]:
    """Apply, in one transaction, every batch of *batches* (one target) that the fences
    admit now, one per shard: the generation and each of those shards' fences are compared,
    each shard's ops and fence written. A flush of the watcher touches a few shards; one
    transaction instead of one per shard (and one read of all the fences instead of one
    per batch) is what keeps a worker ahead of many sources. Returns (applied, rest), in
    order; the rest (all of them, if the group does not land) go through apply_batch, which
    owns every special case: gaps, races, sizes, leases, resyncs. A copy of an applied
    batch stays in the rest, to be refused as a duplicate. *max_ops* and *max_bytes*
    are the target's limits per transaction (sync.max_batch_ops + 1, sync.max_batch_bytes),
    for reads and compares too. *deferred*, if given, gets the batches of the rest that can
    only wait for a later group, each with the fence the read found: those whose
    predecessor is missing, and those that follow a batch of their shard, share a key with
    it or do not fit beside the chosen ones. They need no read of their own.

    *known*, if given, holds views from an earlier group of the same task (the caller's
    cache): when it covers every shard, the read is skipped, and after a commit it holds
    what this worker just wrote. A view gone stale only fails the compare, after which the
    cache is emptied and everything goes the one-batch way; a task of many full batches
    thus costs one read, not one per transaction."""
    if not batches:
        return [], []
    shards = sorted({b.shard for b in batches})[: max_ops - 1]
    if known is not None and all(s in known for s in shards):
        views = {s: known[s] for s in shards}
    else:
        views = store.read_fences(batches[0].source, shards)
        if known is not None:
            known.update(views)
    chosen: list[Batch] = []
    parts: list[Part] = []
    keys: set[bytes] = set()
    ops = bytes_ = 0

    def defer(b: Batch, view: FenceView) -> None:
        if deferred is not None:
            deferred.append((b, view.fence))

    for b in batches:
        view = views.get(b.shard)
        if view is None or view.fence_corrupt:
            continue
        if b.shard in {p.shard for p in parts}:
            defer(b, view)  # after its predecessor, in the next group
            continue
        decision = decide(b.gen, b.prev, b.pos, view.gen, view.fence)
        if decision is not Decision.APPLY:
            if decision is Decision.GAP:
                defer(b, view)
            continue
        if not in_its_shard(b, view.shards):
            continue
        size = sum(op.size for op in b.ops)
        if ops + len(b.ops) + 1 > max_ops or bytes_ + size > max_bytes:
            if chosen:
                defer(b, view)  # a group of its own takes it; alone, it is apply_batch's
            continue
        if any(op.key in keys for op in b.ops):
            defer(b, view)
            continue
        keys.update(op.key for op in b.ops)
        ops, bytes_ = ops + len(b.ops) + 1, bytes_ + size
        chosen.append(b)
        parts.append(
            Part(b.shard, view.fence_rev, b.ops, FenceRecord(b.gen, b.pos, b.done), b.lease)
        )
    if not chosen:
        return [], list(batches)
    gen_rev = views[chosen[0].shard].gen_rev
    try:
        landed = store.commit_group(chosen[0].source, gen_rev, parts)
    except (RequestTooLargeError, LeaseGoneError):
        landed = 0  # apply_batch handles each on its own
    if not landed:
        if deferred is not None:
            deferred.clear()  # the fences moved meanwhile: what the read showed is old
        if known is not None:
            known.clear()
        return [], list(batches)
    if known is not None:
        for b, p in zip(chosen, parts, strict=True):
            v = views[b.shard]
            known[b.shard] = FenceView(v.gen, v.gen_rev, p.fence, landed, v.shards)
    rest = list(batches)
    for b in chosen:
        rest.remove(b)  # one copy
    return chosen, rest


def in_its_shard(batch: Batch, shards: int) -> bool:
    """Whether the batch's shard exists in a generation of *shards* shards and every key of
    it hashes to that shard: the per-shard order the fence keeps is only an order if no
    key's changes are spread over two shards."""
    parsed = parse_shard(batch.shard)
    if parsed is None:
        return False
    resource, index = parsed
    if index >= max(1, shards if not resource.single_key else 1):
        return False
    return all(shard_of(resource, op.key, shards) == batch.shard for op in batch.ops)


def _commit_split(
    store: TargetStore,
    batch: Batch,
    seen: FenceView,
    fence: FenceRecord,
    on_reject: Callable[[Operation, str], None] | None,
) -> bool:
    """The target refused the batch for its size: apply it in smaller parts, each guarded by
    the same compare but leaving the fence alone, then move the fence on its own. A part
    that lands early is harmless: the fence still admits nobody but this batch, and a
    redelivery writes the same values again. A single operation still too large is skipped,
    its key deleted (no stale value stays cached) and recorded for `kvmesh verify`."""
    rejected: list[tuple[Operation, str]] = []

    def apply(ops: list[Operation]) -> bool:
        try:
            return store.commit(batch.source, batch.shard, seen, ops, None, batch.lease)
        except RequestTooLargeError as exc:
            if len(ops) > 1:
                mid = len(ops) // 2
                return apply(ops[:mid]) and apply(ops[mid:])
            op = ops[0]
            rejected.append((op, f"the target refused {op.size} bytes: {exc}"))
            return store.commit(
                batch.source, batch.shard, seen, [Operation(Op.DELETE, op.key)], None
            )

    if not apply(list(batch.ops)):
        return False
    records = []
    for op, reason in rejected:
        if on_reject is not None:
            on_reject(op, reason)
        digest = hashlib.sha256(op.value or b"").hexdigest()
        records.append(
            Operation(
                Op.PUT,
                rejected_key(batch.source, op.key),
                json.dumps({"reason": reason, "sha256": digest}).encode(),
            )
        )
    return store.commit(batch.source, batch.shard, seen, records, fence)
