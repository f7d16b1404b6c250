"""The narrow interface the batch applier needs from a target, with the etcd implementation
and an in-memory twin for unit and property tests of the fence protocol."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from etcd3 import transactions

from .errors import RequestTooLargeError
from .etcd import Etcd
from .fence import FenceRecord, GenRecord
from .layout import Op, fence_key, gen_key, resync_key
from .wire import Operation


@dataclass(frozen=True)
class FenceView:
    """What a worker read: the generation, the shard's fence, and their mod revisions (0 when
    absent) for the compare of the apply transaction."""

    gen: int | None
    gen_rev: int
    fence: FenceRecord | None
    fence_rev: int


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


def _resync_request(gen: int, reason: str) -> bytes:
    return json.dumps({"gen": gen, "reason": reason, "ts": time.time()}).encode()


class EtcdTargetStore:
    """A target etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    def read_fence(self, source: str, shard: str) -> FenceView:
        _, responses = self.etcd.txn(
            [], [transactions.Get(gen_key(source)), transactions.Get(fence_key(source, shard))]
        )
        gen_kvs, fence_kvs = responses
        gen, gen_rev = None, 0
        if gen_kvs:
            value, meta = gen_kvs[0]
            gen, gen_rev = GenRecord.decode(value).gen, meta.mod_revision
        fence, fence_rev = None, 0
        if fence_kvs:
            value, meta = fence_kvs[0]
            fence, fence_rev = FenceRecord.decode(value), meta.mod_revision
        return FenceView(gen, gen_rev, fence, fence_rev)

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
        self.etcd.put(resync_key(source), _resync_request(gen, reason))


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
        return FenceView(
            GenRecord.decode(g[0]).gen if g else None,
            g[1] if g else 0,
            FenceRecord.decode(f[0]) if f else None,
            f[1] if f else 0,
        )

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
