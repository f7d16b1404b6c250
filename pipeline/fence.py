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

WARNING - STABLE API: the record formats are read by every kvmesh version in a mesh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Position = tuple[int, int]  # (source revision, index of the event within that revision)
ZERO: Position = (0, 0)


class Decision(StrEnum):
    APPLY = "applied"
    DUPLICATE = "duplicate"  # already applied (a redelivery)
    OBSOLETE = "obsolete"  # an older generation
    GAP = "gap_wait"  # its predecessor has not landed yet
    RESYNC = "resync"  # the target lost its kvmesh records, or the chain is broken


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
        d = _load(raw)
        return cls(
            gen=int(d["gen"]),
            shards=int(d.get("shards", 0)),
            identities=str(d.get("identities", "id")),
            source_cluster_id=int(d.get("source_cluster_id", 0)),
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
        d = _load(raw)
        pos = d["pos"]
        return cls(gen=int(d["gen"]), pos=(int(pos[0]), int(pos[1])), done=bool(d["done"]))


def _load(raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt kvmesh record: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError("corrupt kvmesh record: not an object")
    return d


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
