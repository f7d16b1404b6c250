"""The task payload."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import MalformedBatchError
from pipeline.layout import Op
from pipeline.wire import Batch, Operation, decode_task, encode_task


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
    other = _batch(shard="ipcache-0", ops=(Operation(Op.DELETE, b"x"),))
    wire = json.loads(json.dumps(encode_task([b, other])))
    assert decode_task(wire) == [b, other]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.update(v=99), "schema version"),
        (lambda p: p.update(batches=[]), "batches"),
        (lambda p: p["batches"][0].update(gen=0), "gen"),
        (lambda p: p["batches"][0].update(prev=[1]), "prev"),
        (lambda p: p["batches"][0].update(pos=[1, 0], prev=[2, 0]), "not after"),
        (lambda p: p["batches"][0]["ops"].append(["x", "AA==", None]), "unknown kind"),
        (lambda p: p["batches"][0]["ops"].append(["p", "not base64!", "AA=="]), "base64"),
        (lambda p: p["batches"][0]["ops"].append(p["batches"][0]["ops"][0]), "twice"),
        (lambda p: p["batches"][0].update(source=""), "source"),
        (lambda p: p["batches"].append(dict(p["batches"][0], target="c")), "share"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A payload that does not fit the schema raises MalformedBatchError naming the problem."""
    payload = encode_task([_batch()])
    mutate(payload)
    with pytest.raises(MalformedBatchError, match=reason):
        decode_task(payload)


def test_non_object_payload_is_rejected() -> None:
    """A message that is not even an object is rejected."""
    with pytest.raises(MalformedBatchError):
        decode_task(["not", "a", "batch"])
