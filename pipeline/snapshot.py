"""Snapshots and diffs: the filtered, rewritten state of a source at one revision, what a
target caches of it, and the difference. Shared by the watcher's resync and `kvmesh verify`,
so the two can never disagree about what "in sync" means."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .batching import Change, check_size, overflows
from .errors import BadInputError, LayoutError
from .etcd import Etcd
from .fence import Position
from .layout import RESOURCES, Layout, Op, Resource
from .sharding import shard_of
from .wire import Batch, op_size


@dataclass
class SourceState:
    revision: int
    items: dict[bytes, bytes]  # target key -> target value
    rejected: dict[bytes, str] = field(default_factory=dict)  # source key -> reason


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


def iter_source(
    etcd: Etcd,
    layout: Layout,
    revision: int,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
) -> Iterator[tuple[Resource, bytes, bytes]]:
    """(resource, target key, target value) for every synced key of the source at
    *revision*, read page by page. Bad input goes to *on_reject* and is skipped."""
    for res in RESOURCES:
        _, kvs = etcd.scan(
            res.source_prefix(layout.source, layout.identities),
            revision,
            page,
            exact=res.single_key,
        )
        for kv in kvs:
            try:
                tkey, tvalue = convert(layout, res, kv.key, kv.value, max_bytes)
            except BadInputError as exc:
                on_reject(exc)
                continue
            assert tvalue is not None
            yield res, tkey, tvalue


def read_source(
    etcd: Etcd,
    layout: Layout,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None] | None = None,
) -> SourceState:
    """Every synced key of the source, listed at one revision."""
    state = SourceState(etcd.revision(), {})

    def reject(exc: BadInputError) -> None:
        state.rejected[exc.key] = str(exc)
        if on_reject:
            on_reject(exc)

    for _res, tkey, tvalue in iter_source(
        etcd, layout, state.revision, page=page, max_bytes=max_bytes, on_reject=reject
    ):
        state.items[tkey] = tvalue
    return state


def read_target(etcd: Etcd, source: str, *, page: int) -> dict[bytes, bytes]:
    """Everything the target caches of *source* (all cache prefixes, and its cluster config)."""
    out: dict[bytes, bytes] = {}
    for res in RESOURCES:
        _, kvs = etcd.scan(res.cache_scan_prefix(source), None, page, exact=res.single_key)
        for kv in kvs:
            out[kv.key] = kv.value
    return out


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
    """Turns a source listing at revision R into chained snapshot batches for one target,
    while the listing is still being read, so workers start applying at once.

    Feed it every desired (key, value) with want(); it compares with what the target holds
    and returns full batches as they fill up. finish() adds the deletes (keys the target has
    and the source does not) and returns the rest. Per shard, the last batch is held back
    until finish(), because only the final batch of a shard may be marked done.
    """

    def __init__(
        self,
        *,
        source: str,
        target: str,
        gen: int,
        revision: int,
        actual: dict[bytes, bytes],
        shard_of: Callable[[bytes], str],
        max_ops: int,
        max_bytes: int,
    ) -> None:
        self._source, self._target, self._gen, self._rev = source, target, gen, revision
        self._actual = actual
        self._shard_of = shard_of
        self._max_ops, self._max_bytes = max_ops, max_bytes
        self._seen: set[bytes] = set()
        self._pending: dict[str, list[Change]] = {}
        self._pending_bytes: dict[str, int] = {}
        self._held: dict[str, Batch] = {}
        self._prev: dict[str, Position] = {}
        self._index: dict[str, int] = {}
        self.missing = self.different = self.extra = 0

    def _add(self, key: bytes, op: Op, value: bytes | None, shard: str) -> list[Batch]:
        index = self._index.get(shard, 0) + 1
        self._index[shard] = index
        change = Change(key, op, value, (self._rev, index))
        pending = self._pending.setdefault(shard, [])
        size = op_size(key, value)
        out: list[Batch] = []
        if overflows(
            len(pending), self._pending_bytes.get(shard, 0), size, self._max_ops, self._max_bytes
        ):
            out = self._cut(shard, done=False)
        self._pending.setdefault(shard, []).append(change)
        self._pending_bytes[shard] = self._pending_bytes.get(shard, 0) + size
        return out

    def _cut(self, shard: str, done: bool) -> list[Batch]:
        """Close the shard's pending changes into a batch; release the one held before."""
        changes = self._pending.pop(shard, [])
        self._pending_bytes[shard] = 0
        out: list[Batch] = []
        held = self._held.pop(shard, None)
        if held is not None:
            out.append(held)
        if changes:
            prev = self._prev.get(shard, (self._rev, 0))
            batch = Batch(
                self._source,
                self._target,
                shard,
                self._gen,
                prev,
                changes[-1].pos,
                tuple(c.operation() for c in changes),
                done=done,
            )
            self._prev[shard] = batch.pos
            if done:
                out.append(batch)
            else:
                self._held[shard] = batch
        elif held is not None and done:
            out[-1] = replace(held, done=True)
        return out

    def want(self, key: bytes, value: bytes, shard: str) -> list[Batch]:
        self._seen.add(key)
        have = self._actual.get(key)
        if have == value:
            return []
        if have is None:
            self.missing += 1
        else:
            self.different += 1
        return self._add(key, Op.PUT, value, shard)

    def finish(self) -> list[Batch]:
        out: list[Batch] = []
        for key in sorted(self._actual):
            if key not in self._seen:
                self.extra += 1
                out += self._add(key, Op.DELETE, None, self._shard_of(key))
        for shard in sorted(set(self._pending) | set(self._held)):
            out += self._cut(shard, done=True)
        return out

    def last_positions(self) -> dict[str, Position]:
        """The pos of each shard's final batch (shards without changes are absent)."""
        return dict(self._prev)
