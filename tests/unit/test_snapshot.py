"""The streaming merge and the snapshot cutter: a listing and a target's cache, both in key
order, turned into chained batches while they are being read."""

from __future__ import annotations

import itertools
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import cast

from pipeline.protocol.errors import RetryableError
from pipeline.protocol.layout import Op
from pipeline.protocol.snapshot import Merger, SnapshotCutter, diff
from pipeline.protocol.wire import Batch
from pipeline.source.resync import PUBLISH_EVERY, PUBLISH_FIRST, Snapshot
from pipeline.source.targets import TargetControl


def shard(key: bytes) -> str:
    return f"s-{zlib.crc32(key) % 3}"


def run(
    desired: dict[bytes, bytes], actual: dict[bytes, bytes], max_ops: int = 4
) -> tuple[SnapshotCutter, list[Batch]]:
    cutter = SnapshotCutter(
        source="a", target="b", gen=5, revision=100, max_ops=max_ops, max_bytes=10**6
    )
    merger = Merger(iter(sorted(actual.items())))
    out: list[Batch] = []

    def feed(differences: Iterator[tuple[bytes, bytes | None, bool]]) -> None:
        for key, value, missing in differences:
            if value is None:
                out.extend(cutter.delete(key, shard(key)))
            else:
                out.extend(cutter.put(key, value, shard(key), missing))

    for k, v in sorted(desired.items()):
        feed(merger.push(k, v))
    feed(merger.rest())
    out += cutter.finish()
    return cutter, out


def test_snapshot_batches_apply_to_exactly_the_source_state() -> None:
    """Applying the batches in chain order turns the target into the source state."""
    desired = {f"k{i}".encode(): f"v{i}".encode() for i in range(60)}
    actual = {f"k{i}".encode(): b"old" if i % 3 else f"v{i}".encode() for i in range(40, 90)}
    cutter, batches = run(desired, actual)
    d = diff(desired, actual)
    assert (cutter.missing, cutter.different, cutter.extra) == (
        len(d.missing),
        len(d.different),
        len(d.extra),
    )
    state = dict(actual)
    for b in batches:
        for op in b.ops:
            if op.op is Op.PUT:
                assert op.value is not None
                state[op.key] = op.value
            else:
                state.pop(op.key, None)
    assert state == desired


def test_chains_are_contiguous_and_only_the_last_batch_is_done() -> None:
    """Per shard, batches chain from (R, 0); only the final one marks the shard done."""
    desired = {f"k{i}".encode(): b"v" for i in range(100)}
    _, batches = run(desired, {})
    per: dict[str, list[Batch]] = defaultdict(list)
    for b in batches:
        per[b.shard].append(b)
        assert len(b.ops) <= 4 and len({o.key for o in b.ops}) == len(b.ops)
    assert len(per) == 3
    for chain in per.values():
        assert chain[0].prev == (100, 0)
        for before, after in itertools.pairwise(chain):
            assert after.prev == before.pos
        assert [b.done for b in chain] == [False] * (len(chain) - 1) + [True]


def test_in_sync_target_receives_nothing() -> None:
    """A target that already equals the source gets no batch at all."""
    desired = {f"k{i}".encode(): b"v" for i in range(30)}
    cutter, batches = run(desired, dict(desired))
    assert batches == []
    assert cutter.last_positions() == {}


def test_the_merge_holds_one_item_of_the_target() -> None:
    """The merge reads the target's cache as the source's keys go by, one item at a time."""
    read: list[bytes] = []

    def actual() -> Iterator[tuple[bytes, bytes]]:
        for i in range(10):
            key = f"k{i}".encode()
            read.append(key)
            yield key, b"v"

    merger = Merger(actual())
    assert list(merger.push(b"k3", b"v")) == [
        (b"k0", None, False),
        (b"k1", None, False),
        (b"k2", None, False),
    ]
    assert read == [f"k{i}".encode() for i in range(5)]  # up to one past the pushed key
    assert list(merger.push(b"k35", b"w")) == [(b"k35", b"w", True)]
    assert len(list(merger.rest())) == 6


def _snapshot(publish: Callable[[list[Batch]], None]) -> Snapshot:
    return Snapshot(
        cast(TargetControl, SimpleNamespace(source="a", name="b")),
        SnapshotCutter(source="a", target="b", gen=5, revision=100, max_ops=4, max_bytes=10**6),
        publish,
    )


_BATCH = Batch("a", "b", "s-0", 5, (100, 0), (100, 1), ())


def test_a_resync_publishes_its_first_batches_early() -> None:
    """A resync's first publish goes as soon as a task's worth of batches is cut, so the
    workers start at once; the next ones gather twice as many, up to PUBLISH_EVERY. A
    resource's forced last publish is not a step of that ramp."""
    sizes: list[int] = []
    snap = _snapshot(lambda batches: sizes.append(len(batches)))
    snap.send([_BATCH] * 3, force=True)  # a small resource, listed first
    for _ in range(200):
        snap.send([_BATCH])
    snap.send([], force=True)
    assert sizes[:5] == [3, PUBLISH_FIRST, 2 * PUBLISH_FIRST, 4 * PUBLISH_FIRST, PUBLISH_EVERY]
    assert set(sizes[4:-1]) == {PUBLISH_EVERY} and sum(sizes) == 203


def test_a_failed_snapshot_keeps_nothing() -> None:
    """Once publishing to a target failed, what is cut for it later is dropped, not kept:
    the target stays owed a resync, and a long run of deletes would otherwise pile up."""

    calls: list[int] = []

    def refuse(batches: list[Batch]) -> None:
        calls.append(len(batches))
        raise RetryableError("the broker refused")

    snap = _snapshot(refuse)
    for _ in range(PUBLISH_FIRST + 100):
        snap.send([_BATCH])
    snap.send([_BATCH], force=True)
    assert snap.failed and snap.outbox == [] and calls == [PUBLISH_FIRST]


def test_keys_only_the_target_holds_stream_out() -> None:
    """However many keys only the target holds before a pushed key, they come one at a
    time: the target is read no further than the difference being handed out."""
    read: list[int] = []

    def actual() -> Iterator[tuple[bytes, bytes]]:
        for i in range(1000):
            read.append(i)
            yield f"k{i:04}".encode(), b"v"

    differences = iter(Merger(actual()).push(b"z", b"v"))
    assert next(differences) == (b"k0000", None, False)
    assert len(read) <= 2
    assert sum(1 for _ in differences) == 1000  # the other 999, then z itself
