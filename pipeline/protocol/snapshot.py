"""Snapshots and diffs, as pure code: the conversion of one source key to its target key and
value, the difference between what a source holds and what a target caches, and the cutter
that turns that difference into chained snapshot batches. Shared by the watcher's resync and
`kvmesh verify` (through pipeline.source.listing), so the two can never disagree about what
"in sync" means."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pipeline.protocol.batching import check_size, overflows
from pipeline.protocol.errors import BadInputError, LayoutError
from pipeline.protocol.fence import Position
from pipeline.protocol.layout import RESOURCES, Layout, Op, Resource
from pipeline.protocol.sharding import shard_of
from pipeline.protocol.wire import Batch, Operation, new_operation, op_size


def convert(
    layout: Layout, resource: Resource, key: bytes, value: bytes | None, max_bytes: int
) -> tuple[bytes, bytes | None]:
    """Rewrite one source change to (target key, target value). A source's data is
    untrusted: whatever goes wrong with one key (the layout, its size, a value that does not
    parse, an exception nobody foresaw) is a BadInputError naming that key, so the caller
    rejects it and goes on with the others."""
    try:
        target_key = layout.rewrite(resource, key)
        if value is None:
            return target_key, None
        target_value = layout.transform_value(resource, key, value)
        check_size(target_key, target_value, max_bytes)
    except BadInputError:
        raise
    except Exception as exc:  # untrusted input must never escape as a crash
        raise LayoutError(key, f"cannot be synced: {type(exc).__name__}") from None
    return target_key, target_value


def resource_of_target_key(source: str, key: bytes) -> Resource | None:
    for res in RESOURCES:
        scan = res.cache_scan_prefix(source)
        if (key == scan) if res.single_key else key.startswith(scan):
            return res
    return None


def target_shard(source: str, key: bytes, shards: int) -> str:
    """The shard of a target key (for keys that only the target holds)."""
    res = resource_of_target_key(source, key)
    assert res is not None, key
    return shard_of(res, key, shards)


class Merger:
    """One target's side of a streaming merge: its cache, in key order, against the source's
    keys pushed in key order. Only the target's current item is held."""

    def __init__(self, actual: Iterator[tuple[bytes, bytes | None]]) -> None:
        self._actual = actual
        self._head = next(actual, None)

    def push(self, key: bytes, value: bytes) -> Iterable[tuple[bytes, bytes | None, bool]]:
        """The differences up to *key*: (key, None, False) for each key only the target
        holds, then (key, value, missing) if the target lacks *key* or holds another value.
        This runs once per source key and target: the usual cases (the target holds the key,
        or lacks it and nothing before it) answer without a generator; keys only the target
        holds stream out one at a time, however many there are."""
        head = self._head
        if head is None or head[0] > key:
            return ((key, value, True),)
        if head[0] == key:
            self._head = next(self._actual, None)
            return ((key, value, False),) if head[1] != value else ()
        return self._past(key, value)

    def _past(self, key: bytes, value: bytes) -> Iterator[tuple[bytes, bytes | None, bool]]:
        """push() when the target holds keys before *key*."""
        while self._head is not None and self._head[0] < key:
            yield self._head[0], None, False
            self._head = next(self._actual, None)
        if self._head is not None and self._head[0] == key:
            if self._head[1] != value:
                yield key, value, False
            self._head = next(self._actual, None)
        else:
            yield key, value, True

    def rest(self) -> Iterator[tuple[bytes, bytes | None, bool]]:
        """The keys only the target holds after the last pushed one."""
        while self._head is not None:
            yield self._head[0], None, False
            self._head = next(self._actual, None)


@dataclass
class Diff:
    missing: dict[bytes, bytes]  # in the source, not in the target
    different: dict[bytes, bytes]  # in both, other value (source's value)
    extra: list[bytes]  # in the target only

    @property
    def equal(self) -> bool:
        return not (self.missing or self.different or self.extra)


def diff(desired: dict[bytes, bytes], actual: dict[bytes, bytes]) -> Diff:
    missing: dict[bytes, bytes] = {}
    different: dict[bytes, bytes] = {}
    for key, value in desired.items():
        have = actual.get(key)
        if have is None:
            missing[key] = value
        elif have != value:
            different[key] = value
    extra = sorted(k for k in actual if k not in desired)
    return Diff(missing, different, extra)


class SnapshotCutter:
    """Turns the differences between a source listing at revision R and a target into
    chained snapshot batches for that target, while they are being found, so workers start
    applying at once and nothing of either side is held in memory.

    Feed it every difference: put() for a key the target lacks or holds with another value,
    delete() for a key only the target holds. It returns full batches as they fill up;
    finish() returns the rest. Per shard, the last batch is held back until finish(),
    because only the final batch of a shard may be marked done. Its memory is one batch
    and one held batch per shard.
    """

    def __init__(
        self,
        *,
        source: str,
        target: str,
        gen: int,
        revision: int,
        max_ops: int,
        max_bytes: int,
    ) -> None:
        self._source, self._target, self._gen, self._rev = source, target, gen, revision
        self._max_ops, self._max_bytes = max_ops, max_bytes
        self._shards: dict[str, _Shard] = {}
        self.missing = self.different = self.extra = 0

    def _add(self, key: bytes, op: Op, value: bytes | None, shard: str) -> Sequence[Batch]:
        # once per key written: one look-up of the shard's state, and the operation made
        # as it is sent (no intermediate Change)
        st = self._shards.get(shard)
        if st is None:
            st = self._shards[shard] = _Shard((self._rev, 0))
        size = op_size(key, value)
        out: Sequence[Batch] = ()
        if overflows(len(st.ops), st.bytes, size, self._max_ops, self._max_bytes):
            out = self._cut(shard, st, done=False)
        st.ops.append(new_operation((op, key, value)))
        st.bytes += size
        st.index += 1
        return out

    def _cut(self, shard: str, st: _Shard, done: bool) -> list[Batch]:
        """Close the shard's pending operations into a batch; release the one held before."""
        ops, st.ops, st.bytes = st.ops, [], 0
        out: list[Batch] = []
        held, st.held = st.held, None
        if held is not None:
            out.append(held)
        if ops:
            pos = (self._rev, st.index)
            batch = Batch(
                self._source, self._target, shard, self._gen, st.prev, pos, tuple(ops), done=done
            )
            st.prev = pos
            if done:
                out.append(batch)
            else:
                st.held = batch
        # (a held batch always has pending operations after it: _add appends one at once,
        # so the last batch cut for a shard is the one that says done)
        return out

    def put(self, key: bytes, value: bytes, shard: str, missing: bool) -> Sequence[Batch]:
        """The target lacks *key* (missing) or holds another value."""
        if missing:
            self.missing += 1
        else:
            self.different += 1
        return self._add(key, Op.PUT, value, shard)

    def delete(self, key: bytes, shard: str) -> Sequence[Batch]:
        """Only the target holds *key*."""
        self.extra += 1
        return self._add(key, Op.DELETE, None, shard)

    def finish(self, resource: str | None = None) -> list[Batch]:
        """Close every shard (or only *resource*'s shards, once it is listed: its canary
        then need not wait for the resources listed after it)."""
        out: list[Batch] = []
        for shard in sorted(self._shards):
            if resource is None or shard.rpartition("-")[0] == resource:
                out += self._cut(shard, self._shards[shard], done=True)
        return out

    def last_positions(self) -> dict[str, Position]:
        """The pos of each shard's final batch (shards without changes are absent)."""
        return {shard: st.prev for shard, st in self._shards.items() if st.prev[1]}


class _Shard:
    """A shard's side of a SnapshotCutter: its pending operations (and their bytes), the
    index of the last one, the batch held back and the pos of the last batch cut."""

    __slots__ = ("bytes", "held", "index", "ops", "prev")

    def __init__(self, start: Position) -> None:
        self.ops: list[Operation] = []
        self.bytes = 0
        self.index = 0
        self.held: Batch | None = None
        self.prev = start  # (R, 0) until a batch is cut: a batch's pos has an index of 1 or more
