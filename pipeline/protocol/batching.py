"""Coalescing and cutting changes into batches that etcd accepts in one transaction.

Pure code. A batch names no key twice (etcd rejects that), holds at most `max_ops` operations
(one more is reserved for the fence) and at most `max_bytes` of keys and values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.protocol.errors import ValueTooLargeError
from pipeline.protocol.fence import Position
from pipeline.protocol.layout import Op
from pipeline.protocol.wire import Batch, Operation, op_size


@dataclass(frozen=True)
class Change:
    """One rewritten change to a target key, at its position in the source's history."""

    key: bytes
    op: Op
    value: bytes | None
    pos: Position

    # made once: the batches of one flush for every target share these objects, and a task
    # encodes a list of them once (encode_task)
    operation: Operation = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "operation", Operation(self.op, self.key, self.value))


class ShardBuffer:
    """Pending changes per shard, in position order; a newer change to a key replaces the
    older one (the target only needs the latest state)."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[bytes, Change]] = {}
        self._count = 0
        self.bytes = 0  # of the pending changes' keys and values (op_size)
        # per shard, when its oldest pending change was received (Unix ms): carried in the
        # batches cut from it, for the workers' lag histogram; emptied with the changes
        self.since: dict[str, int] = {}

    def add(self, shard: str, change: Change, received_ms: int = 0) -> None:
        bucket = self._pending.setdefault(shard, {})
        old = bucket.pop(change.key, None)
        if old is None:
            self._count += 1
        else:
            self.bytes -= op_size(old.key, old.value)
        self.bytes += op_size(change.key, change.value)
        bucket[change.key] = change  # re-inserted last: dicts keep position order
        if received_ms and (shard not in self.since or received_ms < self.since[shard]):
            self.since[shard] = received_ms

    def __len__(self) -> int:
        return self._count

    def counts(self) -> dict[str, int]:
        """Changes pending per shard."""
        return {shard: len(b) for shard, b in self._pending.items() if b}

    def min_position(self) -> Position | None:
        """The earliest position still buffered (None when empty)."""
        firsts = [next(iter(b.values())).pos for b in self._pending.values() if b]
        return min(firsts) if firsts else None

    def drain(self) -> dict[str, list[Change]]:
        out = {shard: list(b.values()) for shard, b in self._pending.items() if b}
        self._pending = {}
        self._count = 0
        self.bytes = 0
        self.since = {}
        return out


def check_size(key: bytes, value: bytes | None, max_bytes: int) -> None:
    """Raise ValueTooLargeError if one change alone cannot fit in a request."""
    size = op_size(key, value)
    if size > max_bytes:
        raise ValueTooLargeError(key, f"{size} bytes exceed the batch limit of {max_bytes} bytes")


def overflows(count: int, size: int, add: int, max_ops: int, max_bytes: int) -> bool:
    """Whether adding an operation of *add* bytes to a group of *count* operations and
    *size* bytes would break either limit (an empty group always takes one)."""
    return count > 0 and (count >= max_ops or size + add > max_bytes)


def cut(changes: Sequence[Change], max_ops: int, max_bytes: int) -> list[list[Change]]:
    """Split position-ordered, key-unique changes into consecutive groups within both limits.

    Every change must already fit alone (see check_size)."""
    groups: list[list[Change]] = []
    current: list[Change] = []
    size = 0
    for ch in changes:
        ch_size = op_size(ch.key, ch.value)
        if overflows(len(current), size, ch_size, max_ops, max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(ch)
        size += ch_size
    if current:
        groups.append(current)
    return groups


def make_batches(
    *,
    source: str,
    target: str,
    shard: str,
    gen: int,
    prev: Position,
    changes: Iterable[Change],
    max_ops: int,
    max_bytes: int,
    snapshot: bool = False,
    event_ms: int = 0,
) -> list[Batch]:
    """Chain batches for one shard: each batch's prev is the pos of the one before it.

    For a snapshot (a resync's diff) every batch but the last is marked not done, so that a
    fence left in the middle of a snapshot is never taken as a resume point."""
    ordered = list(changes)
    batches: list[Batch] = []
    groups = cut(ordered, max_ops, max_bytes)
    for i, group in enumerate(groups):
        pos = group[-1].pos
        batches.append(
            Batch(
                source=source,
                target=target,
                shard=shard,
                gen=gen,
                prev=prev,
                pos=pos,
                ops=tuple(c.operation for c in group),
                done=not snapshot or i == len(groups) - 1,
                event_ms=event_ms,
            )
        )
        prev = pos
    return batches
