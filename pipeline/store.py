"""The narrow interface the batch applier needs from a target, with the etcd implementation
and an in-memory twin for unit and property tests of the fence protocol."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from etcd3 import transactions

from .errors import CorruptRecordError, RequestTooLargeError
from .etcd import Etcd
from .fence import FenceRecord, GenRecord
from .layout import Op, fence_key, gen_key, resync_key
from .wire import Operation, Signer


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
    ) -> bool:
        """Apply *ops* and move the fence (unless *fence* is None) in one transaction, if
        neither the generation nor the fence changed since *seen*. False if they did.
        Raises RequestTooLargeError if the target refuses the request for its size."""
        ...

    def request_resync(self, source: str, gen: int, reason: str) -> None: ...


def _resync_request(gen: int, reason: str, signer: Signer | None) -> bytes:
    """A worker's request, signed like a task: a watcher resyncs only for a request a worker
    of this mesh wrote, for the generation it runs."""
    request: dict[str, object] = {"gen": gen, "reason": reason, "ts": int(time.time() * 1000)}
    return json.dumps(signer.sign(request) if signer else request).encode()


class EtcdTargetStore:
    """A target etcd."""

    def __init__(self, etcd: Etcd, signer: Signer | None = None) -> None:
        self.etcd = etcd
        self.signer = signer

    def read_fence(self, source: str, shard: str) -> FenceView:
        _, responses = self.etcd.txn(
            [], [transactions.Get(gen_key(source)), transactions.Get(fence_key(source, shard))]
        )
        gen_kvs, fence_kvs = responses
        gen_raw, gen_rev, fence_raw, fence_rev = None, 0, None, 0
        if gen_kvs:
            gen_raw, meta = gen_kvs[0]
            gen_rev = meta.mod_revision
        if fence_kvs:
            fence_raw, meta = fence_kvs[0]
            fence_rev = meta.mod_revision
        return _view(gen_raw, gen_rev, fence_raw, fence_rev)

    def commit(
        self,
        source: str,
        shard: str,
        seen: FenceView,
        ops: Sequence[Operation],
        fence: FenceRecord | None,
    ) -> bool:
        tx = self.etcd.tx
        compare = [
            tx.mod(gen_key(source)) == seen.gen_rev,
            tx.mod(fence_key(source, shard)) == seen.fence_rev,
        ]
        success = [
            transactions.Put(o.key, o.value) if o.op is Op.PUT else transactions.Delete(o.key)
            for o in ops
        ]
        if fence is not None:
            success.append(transactions.Put(fence_key(source, shard), fence.encode()))
        ok, _ = self.etcd.txn(compare, success)
        return ok

    def request_resync(self, source: str, gen: int, reason: str) -> None:
        self.etcd.put(resync_key(source), _resync_request(gen, reason, self.signer))


class MemoryTargetStore:
    """An in-memory target with etcd's mod-revision semantics, for tests of pure logic."""

    def __init__(self, max_request_bytes: int = 0) -> None:
        self.max_request_bytes = max_request_bytes  # 0: no limit
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.revision = 0
        self.resync_requests: list[tuple[str, int, str]] = []

    def _rev(self, key: bytes) -> int:
        entry = self.data.get(key)
        return entry[1] if entry else 0

    def put(self, key: bytes, value: bytes) -> None:
        self.revision += 1
        self.data[key] = (value, self.revision)

    def read_fence(self, source: str, shard: str) -> FenceView:
        g = self.data.get(gen_key(source))
        f = self.data.get(fence_key(source, shard))
        return _view(g[0] if g else None, g[1] if g else 0, f[0] if f else None, f[1] if f else 0)

    def commit(
        self,
        source: str,
        shard: str,
        seen: FenceView,
        ops: Sequence[Operation],
        fence: FenceRecord | None,
    ) -> bool:
        if self.max_request_bytes and sum(o.size for o in ops) > self.max_request_bytes:
            raise RequestTooLargeError("request is too large")
        if self._rev(gen_key(source)) != seen.gen_rev:
            return False
        if self._rev(fence_key(source, shard)) != seen.fence_rev:
            return False
        self.revision += 1
        for o in ops:
            if o.op is Op.PUT:
                assert o.value is not None
                self.data[o.key] = (o.value, self.revision)
            else:
                self.data.pop(o.key, None)
        if fence is not None:
            self.data[fence_key(source, shard)] = (fence.encode(), self.revision)
        return True

    def request_resync(self, source: str, gen: int, reason: str) -> None:
        self.resync_requests.append((source, gen, reason))
