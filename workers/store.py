"""The narrow interface the batch applier needs from a target, with the etcd implementation
and an in-memory twin for unit and property tests of the fence protocol."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.clients.etcd import KV, Compare, EtcdClient, Get, ModIs, Put, TxnOp, ValueIs, Writes
from pipeline.protocol.errors import CorruptRecordError
from pipeline.protocol.fence import FenceRecord, GenRecord
from pipeline.protocol.names import fence_key, gen_key, resync_key
from pipeline.protocol.wire import Operation, Signer


@dataclass(frozen=True)
class FenceView:
    """What a worker read: the generation, the shard's fence, and their mod revisions (0 when
    absent) for the compare of the apply transaction. A record that does not decode is taken
    as absent (a corrupt generation record reads as none: the target needs a resync); a
    corrupt fence is flagged, and the worker asks for a resync."""

    gen: int | None
    gen_rev: int
    fence: FenceRecord | None
    fence_rev: int
    shards: int = 0  # of the generation record: the shard count of this generation
    fence_corrupt: bool = False


def _view(
    gen_raw: bytes | None, gen_rev: int, fence_raw: bytes | None, fence_rev: int
) -> FenceView:
    gen: GenRecord | None = None
    if gen_raw is not None:
        try:
            gen = GenRecord.decode(gen_raw)
        except CorruptRecordError:
            gen = None
    fence: FenceRecord | None = None
    corrupt = False
    if fence_raw is not None:
        try:
            fence = FenceRecord.decode(fence_raw)
        except CorruptRecordError:
            corrupt = True
    return FenceView(
        None if gen is None else gen.gen,
        gen_rev,
        fence,
        fence_rev,
        0 if gen is None else gen.shards,
        corrupt,
    )


class TargetStore(Protocol):
    def read_fence(self, source: str, shard: str) -> FenceView: ...

    def commit(
        self,
        source: str,
        shard: str,
        seen: FenceView,
        ops: Sequence[Operation],
        fence: FenceRecord | None,
        lease: int = 0,
    ) -> bool:
        """Apply *ops* (puts on *lease*, if not 0) and move the fence (unless *fence* is
        None) in one transaction, if neither the generation nor the fence changed since
        *seen*. False if they did. Raises RequestTooLargeError if the target refuses the
        request for its size, LeaseGoneError if the lease no longer exists."""
        ...

    def read_fences(self, source: str, shards: Sequence[str]) -> dict[str, FenceView]:
        """read_fence for several shards at once (one read of the generation)."""
        ...

    def commit_group(
        self, source: str, gen_rev: int, parts: Sequence[Part], read_back: Sequence[str] = ()
    ) -> tuple[int, dict[str, FenceView]]:
        """Apply the batches of several shards in one transaction: each part's ops and its
        fence, if the generation and every part's fence are as read (or as guessed, see
        Part.expect). Returns the revision it wrote at (the fences' new mod revision) and
        no views; or, if the compares failed, 0 and the views of the generation and the
        fences of *read_back* as the same transaction found them (read_fences, without a
        round trip of its own)."""
        ...

    def request_resync(self, source: str, gen: int, reason: str) -> None: ...


@dataclass(frozen=True)
class Part:
    """One shard's batch inside a group transaction."""

    shard: str
    fence_rev: int  # the fence's mod revision as read (the compare)
    ops: Sequence[Operation]
    fence: FenceRecord
    lease: int = 0
    # if set, the compare is on the fence's value instead: the record this batch's
    # predecessor wrote, byte for byte, expected without a read (a guess that holds
    # whenever the batch is next in its chain; see apply_group)
    expect: bytes | None = None


def _fence_reads(source: str, shards: Sequence[str]) -> list[Get]:
    return [Get(gen_key(source)), *(Get(fence_key(source, s)) for s in shards)]


def _views(shards: Sequence[str], reads: Sequence[KV | None]) -> dict[str, FenceView]:
    """The views of *shards* from the reads of _fence_reads."""
    gen = reads[0]
    return {
        shard: _view(
            gen.value if gen else None,
            gen.mod_revision if gen else 0,
            f.value if f else None,
            f.mod_revision if f else 0,
        )
        for shard, f in zip(shards, reads[1:], strict=True)
    }


def _ops(ops: Sequence[Operation], lease: int) -> list[TxnOp]:
    """A batch's operations as they go to etcd, in one Writes: an Operation's value is None
    for a delete and bytes for a put (decode_task makes every put's value, even an empty
    one)."""
    return [Writes(ops, lease)]


def _resync_request(gen: int, reason: str, signer: Signer | None) -> bytes:
    """A worker's request, signed like a task: a watcher resyncs only for a request a worker
    of this mesh wrote, for the generation it runs."""
    request: dict[str, object] = {"gen": gen, "reason": reason, "ts": int(time.time() * 1000)}
    return json.dumps(signer.sign(request) if signer else request).encode()


class EtcdTargetStore:
    """A target etcd."""

    def __init__(self, etcd: EtcdClient, signer: Signer | None = None) -> None:
        self.etcd = etcd
        self.signer = signer

    def read_fence(self, source: str, shard: str) -> FenceView:
        return _views([shard], self.etcd.txn([], _fence_reads(source, [shard])).reads)[shard]

    def commit(
        self,
        source: str,
        shard: str,
        seen: FenceView,
        ops: Sequence[Operation],
        fence: FenceRecord | None,
        lease: int = 0,
    ) -> bool:
        compare = [
            ModIs(gen_key(source), seen.gen_rev),
            ModIs(fence_key(source, shard), seen.fence_rev),
        ]
        success: list[TxnOp] = _ops(ops, lease)
        if fence is not None:
            success.append(Put(fence_key(source, shard), fence.encode()))
        return self.etcd.txn(compare, success).succeeded

    def read_fences(self, source: str, shards: Sequence[str]) -> dict[str, FenceView]:
        return _views(shards, self.etcd.txn([], _fence_reads(source, shards)).reads)

    def commit_group(
        self, source: str, gen_rev: int, parts: Sequence[Part], read_back: Sequence[str] = ()
    ) -> tuple[int, dict[str, FenceView]]:
        compare: list[Compare] = [ModIs(gen_key(source), gen_rev)]
        success: list[TxnOp] = []
        for p in parts:
            key = fence_key(source, p.shard)
            compare.append(ModIs(key, p.fence_rev) if p.expect is None else ValueIs(key, p.expect))
            success += _ops(p.ops, p.lease)
            success.append(Put(key, p.fence.encode()))
        failure = _fence_reads(source, read_back) if read_back else []
        result = self.etcd.txn(compare, success, failure)
        if result.succeeded:
            return result.revision, {}
        return 0, _views(read_back, result.reads) if read_back else {}

    def request_resync(self, source: str, gen: int, reason: str) -> None:
        self.etcd.put(resync_key(source), _resync_request(gen, reason, self.signer))
