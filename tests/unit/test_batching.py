"""Coalescing and batch cutting."""

from __future__ import annotations

import pytest

from pipeline.protocol.batching import Change, ShardBuffer, check_size, cut, make_batches
from pipeline.protocol.errors import ValueTooLargeError
from pipeline.protocol.layout import Op
from pipeline.protocol.wire import op_size


def ch(key: str, rev: int, value: bytes | None = b"v", idx: int = 0) -> Change:
    return Change(key.encode(), Op.PUT if value is not None else Op.DELETE, value, (rev, idx))


def test_buffer_keeps_the_latest_change_per_key_in_position_order() -> None:
    """A newer change to a key replaces the older one and moves to its new position."""
    buf = ShardBuffer()
    buf.add("s", ch("a", 1))
    buf.add("s", ch("b", 2))
    buf.add("s", ch("a", 3, None))
    assert len(buf) == 2
    drained = buf.drain()
    assert [(c.key, c.op, c.pos) for c in drained["s"]] == [
        (b"b", Op.PUT, (2, 0)),
        (b"a", Op.DELETE, (3, 0)),
    ]
    assert len(buf) == 0 and buf.drain() == {}


def test_cut_respects_op_and_byte_limits() -> None:
    """No group exceeds the operation or byte limit, and nothing is lost or reordered."""
    changes = [ch(f"k{i:04d}", i, b"x" * (i % 50)) for i in range(1000)]
    groups = cut(changes, 127, 3000)
    assert [c for g in groups for c in g] == changes
    for g in groups:
        assert len(g) <= 127
        assert sum(c.operation.size for c in g) <= 3000
    assert len(cut(changes, 127, 10**9)) == 8  # ceil(1000 / 127)


def test_oversized_change_is_bad_input() -> None:
    """A single value over the request limit is reported with its key."""
    with pytest.raises(ValueTooLargeError) as err:
        check_size(b"big", b"x" * 5000, 4096)
    assert err.value.key == b"big"


def test_batches_chain_and_carry_no_key_twice() -> None:
    """Each batch's prev is its predecessor's pos; positions increase; keys are unique."""
    buf = ShardBuffer()
    for i in range(600):
        buf.add("s", ch(f"k{i % 300}", i + 1))
    batches = make_batches(
        source="a",
        target="b",
        shard="s",
        gen=4,
        prev=(0, 0),
        changes=buf.drain()["s"],
        max_ops=127,
        max_bytes=10**6,
    )
    assert sum(len(b.ops) for b in batches) == 300
    prev = (0, 0)
    for b in batches:
        assert b.prev == prev and b.pos > b.prev
        assert len({o.key for o in b.ops}) == len(b.ops) <= 127
        assert b.gen == 4 and b.done
        prev = b.pos


def test_snapshot_batches_are_done_only_at_the_end() -> None:
    """Inside a snapshot only the last batch marks the shard resumable again."""
    changes = [ch(f"k{i}", 100, idx=i + 1) for i in range(300)]
    batches = make_batches(
        source="a",
        target="b",
        shard="s",
        gen=1,
        prev=(100, 0),
        changes=changes,
        max_ops=127,
        max_bytes=10**6,
        snapshot=True,
    )
    assert [b.done for b in batches] == [False, False, True]


def test_the_buffer_counts_the_bytes_it_holds() -> None:
    """A change that replaces an older one of its key counts instead of it."""
    buf = ShardBuffer()
    buf.add("s", Change(b"k", Op.PUT, b"x" * 100, (1, 0)))
    buf.add("s", Change(b"k", Op.PUT, b"x" * 10, (2, 0)))
    buf.add("t", Change(b"j", Op.DELETE, None, (3, 0)))
    assert buf.bytes == op_size(b"k", b"x" * 10) + op_size(b"j", None)
    buf.drain()
    assert buf.bytes == 0
