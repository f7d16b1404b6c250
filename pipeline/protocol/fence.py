"""The fence protocol: the decision a worker takes for one batch, and the fence records.

Pure code, no I/O. Celery delivers at least once and in no fixed order; the fence makes that
safe. Each (source, target, shard) has one fence record in the target etcd, written in the same
transaction as the batch it admits, and each (source, target) has one generation record:

    gen record    kvmesh/<source>/gen            {"gen": G, ...}
    fence record  kvmesh/<source>/fence/<shard>  {"gen": g, "pos": [rev, idx], "done": bool}

A batch carries (gen, prev, pos). It is applied only if its gen is the current generation and
its prev is exactly the fence's pos, so every shard's batches land once, in the order the
watcher published them. Bumping the gen record makes every in-flight batch of an older
generation obsolete at once, since each apply transaction compares the gen record's revision.

`done` is false while a shard is in the middle of a snapshot (a resync's diff). A restarted
watcher may resume from a fence only if it is done; otherwise it resyncs.

WARNING - STABLE API: the record formats are read by every kvmesh version in a mesh. A
worker also compares fences by value with records it encodes itself (workers/applier.py:
apply_group's guesses): FenceRecord.encode must stay byte for byte the same, or those
compares all fail (safe, but each costs a read back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.protocol.errors import CorruptRecordError

Position = tuple[int, int]  # (source revision, index of the event within that revision)
ZERO: Position = (0, 0)


class Decision(StrEnum):
    APPLY = "applied"
    DUPLICATE = "duplicate"  # already applied (a redelivery)
    OBSOLETE = "obsolete"  # an older generation
    GAP = "gap_wait"  # its predecessor has not landed yet
    RESYNC = "resync"  # the target lost its kvmesh records, or the chain is broken
    FORBIDDEN = "forbidden"  # its shard does not exist in this generation, or a key is not
    # in its shard: a batch no watcher of this generation made


@dataclass(frozen=True)
class GenRecord:
    gen: int
    shards: int
    identities: str
    source_cluster_id: int  # the source etcd's cluster ID (its identity across a wipe)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "gen": self.gen,
                "shards": self.shards,
                "identities": self.identities,
                "source_cluster_id": self.source_cluster_id,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> GenRecord:
        """Raises CorruptRecordError unless *raw* is a well-formed record."""
        d = _load(raw)
        identities = d.get("identities", "id")
        if identities not in ("id", "all"):
            raise CorruptRecordError(f"generation record: identities {identities!r}")
        return cls(
            gen=_int(d, "gen", 1),
            shards=_int(d, "shards", 1),
            identities=identities,
            source_cluster_id=_int(d, "source_cluster_id", 0, 1 << 64),
        )


@dataclass(frozen=True)
class FenceRecord:
    gen: int
    pos: Position
    done: bool = True

    def encode(self) -> bytes:
        return json.dumps(
            {"gen": self.gen, "pos": list(self.pos), "done": self.done}, separators=(",", ":")
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FenceRecord:
        """Raises CorruptRecordError unless *raw* is a well-formed record."""
        d = _load(raw)
        pos = d.get("pos")
        if not isinstance(pos, list) or len(pos) != 2:
            raise CorruptRecordError(f"fence record: pos {pos!r}")
        done = d.get("done")
        if not isinstance(done, bool):
            raise CorruptRecordError(f"fence record: done {done!r}")
        return cls(
            gen=_int(d, "gen", 1),
            pos=(_int({"r": pos[0]}, "r", 0), _int({"i": pos[1]}, "i", 0)),
            done=done,
        )


_MAX_RECORD = 4096  # bytes: kvmesh's records are a few dozen


def _load(raw: bytes) -> dict[str, Any]:
    if len(raw) > _MAX_RECORD:
        raise CorruptRecordError(f"kvmesh record of {len(raw)} bytes")
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptRecordError(f"kvmesh record is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise CorruptRecordError("kvmesh record is not an object")
    return d


def _int(d: dict[str, Any], name: str, low: int, high: int = 1 << 63) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v < high:
        raise CorruptRecordError(f"kvmesh record: {name} {str(v)[:40]!r}")
    return v


def decide(
    batch_gen: int,
    prev: Position,
    pos: Position,
    current_gen: int | None,
    fence: FenceRecord | None,
) -> Decision:
    """What to do with a batch, given the target's generation and this shard's fence.

    `current_gen` is None when the target has no generation record (never synced, or wiped).
    """
    if current_gen is None or batch_gen > current_gen:
        # The target forgot a generation the watcher already opened: it was wiped or restored.
        return Decision.RESYNC
    if batch_gen < current_gen:
        return Decision.OBSOLETE
    if fence is None or fence.gen < batch_gen:
        # The watcher is still writing this generation's base fences.
        return Decision.GAP
    if fence.gen > batch_gen:  # cannot happen while gen records only grow; be safe
        return Decision.OBSOLETE
    if pos <= fence.pos:
        return Decision.DUPLICATE
    if prev == fence.pos:
        return Decision.APPLY
    if prev > fence.pos:
        return Decision.GAP
    # prev < fence.pos < pos: batches overlap, which a single watcher never publishes.
    return Decision.RESYNC
