"""The task payload."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import MalformedBatchError
from pipeline.layout import Op
from pipeline.wire import Batch, Operation, decode_batch


def _batch(**kw: object) -> Batch:
    base: dict[str, object] = dict(
        source="a",
        target="b",
        shard="nodes-1",
        gen=2,
        prev=(10, 0),
        pos=(12, 1),
        ops=(
            Operation(Op.PUT, b"\xff\x00k", b"\x80v"),
            Operation(Op.PUT, b"e", b""),
            Operation(Op.DELETE, b"gone"),
        ),
    )
    base.update(kw)
    return Batch(**base)  # type: ignore[arg-type]


def test_round_trip_is_byte_exact_through_json() -> None:
    """Keys and values that are not UTF-8, and empty values, survive JSON exactly."""
    b = _batch()
    wire = json.loads(json.dumps(b.encode()))
    assert decode_batch(wire) == b


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.update(v=99), "schema version"),
        (lambda p: p.update(gen=0), "gen"),
        (lambda p: p.update(prev=[1]), "prev"),
        (lambda p: p.update(pos=[1, 0], prev=[2, 0]), "not after"),
        (lambda p: p["ops"].append(["x", "AA==", None]), "unknown kind"),
        (lambda p: p["ops"].append(["p", "not base64!", "AA=="]), "base64"),
        (lambda p: p["ops"].append(p["ops"][0]), "twice"),
        (lambda p: p.update(source=""), "source"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A payload that does not fit the schema raises MalformedBatchError naming the problem."""
    payload = _batch().encode()
    mutate(payload)
    with pytest.raises(MalformedBatchError, match=reason):
        decode_batch(payload)


def test_non_object_payload_is_rejected() -> None:
    """A message that is not even an object is rejected."""
    with pytest.raises(MalformedBatchError):
        decode_batch(["not", "a", "batch"])
