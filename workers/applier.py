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
from pipeline.protocol.sharding import all_in_shard, shard_count
from pipeline.protocol.wire import Batch, Operation
from workers.store import FenceView, Part, TargetStore

log = logging.getLogger("kvmesh.worker")

# The longest reason a rejection record keeps (the target's words included).
MAX_REASON = 512
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
    gens: dict[str, FenceView] | None = None,
    looked: set[str] | None = None,
) -> tuple[list[Batch], list[Batch]]:
    """Apply, in one transaction, every batch of *batches* (one target) that the fences
    admit now, one per shard: the generation and each of those shards' fences are compared,
    each shard's ops and fence written. A flush of the watcher touches a few shards; one
    transaction instead of one per shard (and one read of all the fences instead of one
    per batch) is what keeps a worker ahead of many sources. Returns (applied, rest): the
    applied in the order they were chosen (see _large_first), the rest in theirs. The rest
    (all of them, if the group does not land) go through apply_batch, which owns every
    special case: gaps, races, sizes, leases, resyncs. A copy of an applied batch stays in
    the rest, to be refused as a duplicate. *max_ops* and *max_bytes* are the target's
    limits per transaction (sync.max_batch_ops + 1, sync.max_batch_bytes), for reads and
    compares too. *deferred*, if given, gets the batches of the rest that can
    only wait for a later group, each with the fence the read found: those whose
    predecessor is missing, and those that follow a batch of their shard, share a key with
    it or do not fit beside the chosen ones. They need no read of their own.

    *known*, if given, holds views from an earlier group of the same task (the caller's
    cache): a shard it covers needs no read, and after a commit it holds what this worker
    just wrote. *gens*, if given, holds each source's generation as this worker last read
    it (kept across tasks by the caller). With the generation known, a shard that *known*
    does not cover needs no read either: its fence is expected to be the record the first
    batch's predecessor wrote, and the transaction compares the fence's value with that
    record (Part.expect). In steady state a batch is next in its chain, and a task costs
    one transaction and no read. A guess or view that turns out stale only fails the
    compare; the failed transaction reads the generation and the fences back, and the
    group is chosen again from those, without a read of its own. A failed transaction
    that would have written is still a write to etcd (it goes through its log), dearer
    than a read: *looked*, if given, collects the shards this task has read or read back,
    and those are read, never guessed, when they come up again (a batch that waits for
    its predecessor looks at its fence many times)."""
    if not batches:
        return [], []
    source = batches[0].source
    shards = sorted({b.shard for b in batches})[: max_ops - 1]
    known = {} if known is None else known
    looked = set() if looked is None else looked
    gen = gens.get(source) if gens is not None else None
    views = {s: known[s] for s in shards if s in known}
    guessed: set[str] = set()
    if len(views) < len(shards) and gen is not None:
        for b in batches:
            if b.shard in shards and b.shard not in views and b.shard not in looked:
                # the fence its predecessor wrote, done or not as this batch (a chain
                # changes `done` only where a snapshot ends)
                fence = FenceRecord(b.gen, b.prev, b.done)
                views[b.shard] = FenceView(gen.gen, gen.gen_rev, fence, 0, gen.shards)
                guessed.add(b.shard)
    if len(views) < len(shards):
        views, guessed = _read(store, source, shards, known, gens, looked), set()
    out: list[tuple[Batch, FenceRecord | None]] = []
    ordered = _large_first(batches, max_ops)
    for _attempt in range(2):
        out.clear()
        chosen, parts = _choose(ordered, views, guessed, max_ops, max_bytes, out)
        if not chosen and guessed:
            # nothing to commit on the guesses (another generation, say): read, and choose
            # again from what the target holds
            views, guessed = _read(store, source, shards, known, gens, looked), set()
            out.clear()
            chosen, parts = _choose(ordered, views, guessed, max_ops, max_bytes, out)
        if not chosen:
            break
        gen_rev = views[chosen[0].shard].gen_rev
        try:
            landed, fresh = store.commit_group(source, gen_rev, parts, read_back=shards)
        except (RequestTooLargeError, LeaseGoneError):
            landed, fresh = 0, {}  # apply_batch handles each on its own
        if landed:
            for b, p in zip(chosen, parts, strict=True):
                v = views[b.shard]
                known[b.shard] = FenceView(v.gen, v.gen_rev, p.fence, landed, v.shards)
            if deferred is not None:
                deferred += out
            rest = list(batches)
            for b in chosen:
                rest.remove(b)  # one copy
            return chosen, rest
        # the fences or the generation moved meanwhile: what was read or guessed is old
        known.clear()
        out.clear()
        if not fresh:
            break
        views, guessed = fresh, set()
        looked.update(fresh)
        _remember(known, gens, source, fresh)
    if deferred is not None:
        deferred += out
    return [], list(batches)


def _read(
    store: TargetStore,
    source: str,
    shards: Sequence[str],
    known: dict[str, FenceView],
    gens: dict[str, FenceView] | None,
    looked: set[str],
) -> dict[str, FenceView]:
    views = store.read_fences(source, shards)
    looked.update(shards)
    _remember(known, gens, source, views)
    return views


def _remember(
    known: dict[str, FenceView],
    gens: dict[str, FenceView] | None,
    source: str,
    views: dict[str, FenceView],
) -> None:
    known.update(views)
    if gens is None or not views:
        return
    v = next(iter(views.values()))
    if v.gen is None:
        gens.pop(source, None)
    else:
        gens[source] = FenceView(v.gen, v.gen_rev, None, 0, v.shards)


def _choose(
    batches: Sequence[Batch],
    views: dict[str, FenceView],
    guessed: set[str],
    max_ops: int,
    max_bytes: int,
    deferred: list[tuple[Batch, FenceRecord | None]],
) -> tuple[list[Batch], list[Part]]:
    """The batches that *views* admit together in one transaction, with their parts,
    taken first-fit in the order given; the ones that can only wait for a later group go
    to *deferred* (see apply_group)."""
    chosen: list[Batch] = []
    parts: list[Part] = []
    keys: set[bytes] = set()
    taken: set[str] = set()
    ops = bytes_ = 0
    for b in batches:
        view = views.get(b.shard)
        if view is None or view.fence_corrupt:
            continue
        decision = decide(b.gen, b.prev, b.pos, view.gen, view.fence)
        if b.shard in taken:
            if decision is Decision.APPLY or decision is Decision.GAP:
                # after its predecessor (or a copy of a chosen one), in the next group
                deferred.append((b, view.fence))
            # anything else (a duplicate landed before, say) is the one-batch path's
            continue
        if decision is not Decision.APPLY:
            if decision is Decision.GAP:
                deferred.append((b, view.fence))
            continue
        if chosen and view.gen_rev != views[chosen[0].shard].gen_rev:
            # views of two generation records (a thread pool's tasks share the memory of
            # generations): the transaction compares one; the one-batch path takes this
            continue
        # the count first: the checks below look at every key, and a task's full batches
        # come up again in each group until their own (one look per batch, not one per group)
        if ops + len(b.ops) + 1 > max_ops:
            if chosen:
                # a later group takes it, after those checks (a batch with a key outside
                # its shard is then left to apply_batch, which refuses it)
                deferred.append((b, view.fence))
            continue
        if not in_its_shard(b, view.shards):
            continue
        size = sum(op.size for op in b.ops)
        if bytes_ + size > max_bytes:
            if chosen:
                deferred.append((b, view.fence))
            continue
        if any(op.key in keys for op in b.ops):
            deferred.append((b, view.fence))
            continue
        keys.update(op.key for op in b.ops)
        ops, bytes_ = ops + len(b.ops) + 1, bytes_ + size
        chosen.append(b)
        taken.add(b.shard)
        expect = view.fence.encode() if b.shard in guessed and view.fence else None
        parts.append(
            Part(
                b.shard,
                view.fence_rev,
                b.ops,
                FenceRecord(b.gen, b.pos, b.done),
                b.lease,
                expect,
            )
        )
    return chosen, parts


def _large_first(batches: Sequence[Batch], max_ops: int) -> list[Batch]:
    """The batches of more than half a transaction's operations first, then the others,
    each kind in its order, for _choose's first fit. A flush cuts each shard's changes into
    full batches and a short tail, and a task of a few such shards, taken in its order,
    would pair a shard's short batch with nothing (the next shard's full batch no longer
    fits beside it): two transactions per shard, where one per full batch and one for all
    the short ones will do. Two large batches never share a transaction (each also writes
    its fence), so their order costs no transaction. Operations only: a short batch may
    still be large in bytes, and then takes a transaction of its own as before.

    The price: a task's short batches land together in its last transactions rather than
    each after its shard's full one, so a task in another worker whose batches follow
    them waits that much longer (a backlog's tasks mostly touch shards of their own)."""
    return sorted(batches, key=lambda b: 2 * (len(b.ops) + 1) <= max_ops)


def in_its_shard(batch: Batch, shards: int) -> bool:
    """Whether the batch's shard exists in a generation of *shards* shards and every key of
    it hashes to that shard: the per-shard order the fence keeps is only an order if no
    key's changes are spread over two shards."""
    parsed = parse_shard(batch.shard)
    if parsed is None:
        return False
    resource, index = parsed
    if index >= max(1, shard_count(resource, shards)):
        return False
    return all_in_shard(resource, (op.key for op in batch.ops), shards, index)


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
    its key deleted (no stale value stays cached; a key too large for even its delete is
    left as it is) and recorded for `kvmesh verify` under a name of fixed size, so that
    neither the delete nor the record can fail the batch for the key's size."""
    rejected: list[tuple[Operation, str]] = []

    def apply(ops: list[Operation], lease: int, skip: bool = True) -> bool:
        """Commit *ops* (puts on *lease*) in as few guarded parts as the target takes; with
        *skip*, a single operation it refuses is rejected and its key deleted instead."""
        try:
            return store.commit(batch.source, batch.shard, seen, ops, None, lease)
        except RequestTooLargeError as exc:
            if len(ops) > 1:
                mid = len(ops) // 2
                return apply(ops[:mid], lease, skip) and apply(ops[mid:], lease, skip)
            if not skip:
                raise
            op = ops[0]
            rejected.append((op, f"the target refused {op.size} bytes: {exc}"))
            try:
                return store.commit(
                    batch.source, batch.shard, seen, [Operation(Op.DELETE, op.key)], None
                )
            except RequestTooLargeError:
                # a put of that key is larger still: only a copy from before the target's
                # limit was lowered can be there, and it stays
                log.error(
                    "%s→%s: key %s is too large for the target even to delete; a copy "
                    "cached before its limit was lowered would stay",
                    batch.source,
                    batch.target,
                    show_key(op.key),
                )
                return True

    if not apply(list(batch.ops), batch.lease):
        return False
    records = []
    for op, reason in rejected:
        if on_reject is not None:
            on_reject(op, reason)
        digest = hashlib.sha256(op.value or b"").hexdigest()
        record = {"reason": reason[:MAX_REASON], "sha256": digest}
        records.append(
            Operation(Op.PUT, rejected_key(batch.source, op.key), json.dumps(record).encode())
        )
    # the records (on no lease: they outlive the cache's), each a few hundred bytes, then
    # the fence: in one transaction when the target takes it
    try:
        return store.commit(batch.source, batch.shard, seen, records, fence)
    except RequestTooLargeError:
        if not apply(records, 0, skip=False):
            return False
        return store.commit(batch.source, batch.shard, seen, [], fence)
