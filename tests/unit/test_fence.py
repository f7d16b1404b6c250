"""The fence decision and its records."""

from __future__ import annotations

import pytest

from pipeline.protocol.errors import CorruptRecordError
from pipeline.protocol.fence import Decision, FenceRecord, GenRecord, decide

F = FenceRecord(gen=3, pos=(100, 2))


@pytest.mark.parametrize(
    ("gen", "prev", "pos", "current", "fence", "expected"),
    [
        (3, (100, 2), (105, 0), 3, F, Decision.APPLY),  # the next batch
        (3, (90, 0), (100, 2), 3, F, Decision.DUPLICATE),  # exactly the last one, again
        (3, (80, 0), (90, 0), 3, F, Decision.DUPLICATE),  # an older one, again
        (3, (105, 0), (110, 0), 3, F, Decision.GAP),  # predecessor still in flight
        (2, (100, 2), (105, 0), 3, F, Decision.OBSOLETE),  # older generation
        (4, (100, 2), (105, 0), 3, F, Decision.RESYNC),  # target behind the watcher's gen
        (3, (100, 2), (105, 0), None, None, Decision.RESYNC),  # target wiped
        (3, (100, 2), (105, 0), 3, None, Decision.GAP),  # base fence not written yet
        (3, (100, 2), (105, 0), 3, FenceRecord(2, (100, 2)), Decision.GAP),  # same
        (3, (99, 0), (105, 0), 3, F, Decision.RESYNC),  # overlapping chain
    ],
)
def test_decide(
    gen: int,
    prev: tuple[int, int],
    pos: tuple[int, int],
    current: int | None,
    fence: FenceRecord | None,
    expected: Decision,
) -> None:
    """Each (batch, generation, fence) combination gets the protocol's decision."""
    assert decide(gen, prev, pos, current, fence) is expected


def test_records_round_trip() -> None:
    """Fence and generation records decode to what was encoded."""
    f = FenceRecord(7, (12345, 6), done=False)
    assert FenceRecord.decode(f.encode()) == f
    g = GenRecord(9, 16, "id", 1234567)
    assert GenRecord.decode(g.encode()) == g


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b"[]",
        b"{}",
        b'{"gen": "1", "pos": [1, 0], "done": true}',
        b'{"gen": 1, "pos": [1], "done": true}',
        b'{"gen": 1, "pos": [1, 0], "done": 1}',
        b'{"gen": true, "pos": [1, 0], "done": true}',
        b'{"gen": 1, "pos": [-1, 0], "done": true}',
        b'{"gen": 1e999, "pos": [1, 0], "done": true}',
        b'{"gen": ' + b"9" * 5000 + b', "pos": [1, 0], "done": true}',
        b"[" * 3000 + b"]" * 3000,
    ],
)
def test_corrupt_records_are_errors_of_one_kind(raw: bytes) -> None:
    """A record that is not exactly what kvmesh writes raises CorruptRecordError, which
    every reader takes as "no record", never another exception that could kill a thread."""
    with pytest.raises(CorruptRecordError):
        FenceRecord.decode(raw)
    with pytest.raises(CorruptRecordError):
        GenRecord.decode(raw.replace(b'"pos"', b'"shards"'))
