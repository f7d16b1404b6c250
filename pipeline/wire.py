"""The task payload: a few batches of operations for one target, each batch for one
(source, target, shard) and applied in its own transaction.

WARNING - STABLE API: watchers and workers of different versions share queues. The payload is
plain JSON (Celery's JSON serializer; pickle is never accepted) with a schema version `v`.
Keys and values are base64, so bytes that are not UTF-8 travel exactly.

    {"v": 1, "batches": [
        {"source": "cluster-a", "target": "cluster-b", "shard": "identities-3",
         "gen": 4, "prev": [1200, 0], "pos": [1310, 2], "done": true,
         "ops": [["p", "<b64 key>", "<b64 value>"], ["d", "<b64 key>", null]]},
        ...]}

Several batches travel in one task because Celery's per-task cost, not etcd, bounds a
worker's throughput; each batch still has its own fence decision.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .errors import MalformedBatchError
from .fence import Position
from .layout import Op

SCHEMA_VERSION = 1
TASK_NAME = "kvmesh.apply_batch"  # STABLE API: the watcher publishes by this name


@dataclass(frozen=True)
class Operation:
    op: Op
    key: bytes
    value: bytes | None = None  # None for deletes

    @property
    def size(self) -> int:
        return op_size(self.key, self.value)


def op_size(key: bytes, value: bytes | None) -> int:
    """Bytes one operation adds to an etcd request (key, value and framing)."""
    return len(key) + (len(value) if value is not None else 0) + 16


@dataclass(frozen=True)
class Batch:
    source: str
    target: str
    shard: str
    gen: int
    prev: Position
    pos: Position
    ops: tuple[Operation, ...]
    done: bool = True  # false while the shard is inside a snapshot (see fence.py)

    def encode(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "shard": self.shard,
            "gen": self.gen,
            "prev": list(self.prev),
            "pos": list(self.pos),
            "done": self.done,
            "ops": [
                [
                    o.op.value,
                    base64.b64encode(o.key).decode("ascii"),
                    None if o.value is None else base64.b64encode(o.value).decode("ascii"),
                ]
                for o in self.ops
            ],
        }


def _pos(payload: dict[str, Any], name: str) -> Position:
    raw = payload.get(name)
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw)
    ):
        raise MalformedBatchError(f"field {name!r} must be [revision, index], got {raw!r}")
    return (raw[0], raw[1])


def _str(payload: dict[str, Any], name: str) -> str:
    raw = payload.get(name)
    if not isinstance(raw, str) or not raw:
        raise MalformedBatchError(f"field {name!r} must be a non-empty string, got {raw!r}")
    return raw


def _b64(raw: Any, what: str) -> bytes:
    if not isinstance(raw, str):
        raise MalformedBatchError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MalformedBatchError(f"{what} is not valid base64") from None


MAX_BATCHES_PER_TASK = 64


def encode_task(batches: list[Batch]) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "batches": [b.encode() for b in batches]}


def decode_task(payload: Any) -> list[Batch]:
    """Decode and validate a task payload, or raise MalformedBatchError with the reason."""
    if not isinstance(payload, dict):
        raise MalformedBatchError(f"payload must be a JSON object, got {type(payload).__name__}")
    version = payload.get("v")
    if version != SCHEMA_VERSION:
        raise MalformedBatchError(f"unsupported schema version {version!r}")
    raw = payload.get("batches")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCHES_PER_TASK:
        raise MalformedBatchError(
            f"field 'batches' must be a list of 1 to {MAX_BATCHES_PER_TASK} batches"
        )
    batches = [decode_batch(b) for b in raw]
    if len({(b.source, b.target) for b in batches}) != 1:
        raise MalformedBatchError("batches of one task must share source and target")
    return batches


def decode_batch(payload: Any) -> Batch:
    """Decode and validate one batch of a task payload."""
    if not isinstance(payload, dict):
        raise MalformedBatchError(f"a batch must be a JSON object, got {type(payload).__name__}")
    gen = payload.get("gen")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        raise MalformedBatchError(f"field 'gen' must be a positive integer, got {gen!r}")
    raw_ops = payload.get("ops")
    if not isinstance(raw_ops, list):
        raise MalformedBatchError("field 'ops' must be a list")
    ops: list[Operation] = []
    seen: set[bytes] = set()
    for i, raw in enumerate(raw_ops):
        if not isinstance(raw, list) or len(raw) != 3:
            raise MalformedBatchError(f"op {i} must be [kind, key, value]")
        kind, key, value = raw
        if kind == Op.PUT.value:
            op = Operation(Op.PUT, _b64(key, f"op {i} key"), _b64(value, f"op {i} value"))
        elif kind == Op.DELETE.value:
            op = Operation(Op.DELETE, _b64(key, f"op {i} key"))
        else:
            raise MalformedBatchError(f"op {i} has unknown kind {kind!r}")
        if op.key in seen:
            raise MalformedBatchError(f"op {i} names a key twice in one batch")
        seen.add(op.key)
        ops.append(op)
    prev, pos = _pos(payload, "prev"), _pos(payload, "pos")
    if pos <= prev:
        raise MalformedBatchError(f"pos {pos} is not after prev {prev}")
    done = payload.get("done", True)
    if not isinstance(done, bool):
        raise MalformedBatchError("field 'done' must be a boolean")
    return Batch(
        source=_str(payload, "source"),
        target=_str(payload, "target"),
        shard=_str(payload, "shard"),
        gen=gen,
        prev=prev,
        pos=pos,
        ops=tuple(ops),
        done=done,
    )
