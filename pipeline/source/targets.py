"""The watcher's own reads and writes in one target etcd: its records of the source
(generation, fences, progress, canaries, resync requests) and the cache it lists in a
resync. Every write is guarded by the generation record's mod revision, so a watcher that
was superseded writes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from pipeline.clients.etcd import KV, Delete, EtcdClient, ModIs, Put, TxnOp
from pipeline.config import ClusterConfig
from pipeline.protocol.errors import LeaseGoneError, RetryableError
from pipeline.protocol.fence import FenceRecord, GenRecord
from pipeline.protocol.layout import Resource, canary_key
from pipeline.protocol.names import (
    draining_key,
    fence_key,
    gen_key,
    held_key,
    progress_key,
    rejected_prefix,
    resync_key,
    state_prefix,
)
from pipeline.protocol.wire import Signer
from pipeline.source.leases import TargetLeases
from pipeline.source.planner import (
    Listing,
    TargetRecords,
    Witness,
    encode_progress,
    read_records,
)

_FENCES_PER_TXN = 100  # etcd allows 128 operations per transaction; one is the compare


class TargetControl:
    def __init__(
        self,
        cluster: ClusterConfig,
        etcd: EtcdClient,
        source: str,
        shards: list[str],
        signer: Signer | None,
        page: int,
        lease_ttl: int = 0,
    ) -> None:
        self.cluster = cluster
        self.etcd = etcd
        self.source = source
        self.shards = shards
        self.signer = signer
        self.page = page
        self.leases = TargetLeases(etcd, source, lease_ttl)

    @property
    def name(self) -> str:
        return self.cluster.name

    def close(self) -> None:
        self.etcd.close()

    def read(self) -> TargetRecords:
        _, kvs = self.etcd.scan(state_prefix(self.source), page=self.page)
        raw = {kv.key: (kv.value, kv.mod_revision) for kv in kvs}
        return read_records(raw, self.source, self.shards, self.signer, int(time.time() * 1000))

    def open_generation(self, records: TargetRecords, record: GenRecord) -> int:
        """Compare-and-swap the generation record, and delete a drain record, against what
        *records* read; returns the revision it was written at. A source back in the config
        stops being drained. A drain that began since the read fails the open: the next
        try reads its record and resyncs (planner.plan_start), which puts back the cluster
        config that the drain took first; a resume would not."""
        opened = self.etcd.txn(
            [
                ModIs(gen_key(self.source), records.gen_rev),
                ModIs(draining_key(self.source), records.draining_rev),
            ],
            [Put(gen_key(self.source), record.encode()), Delete(draining_key(self.source))],
        )
        if not opened.succeeded:
            raise RetryableError(
                f"target {self.name}: generation or drain record changed while opening a generation"
            )
        return opened.revision

    def write_fences(self, gen_rev: int, fences: dict[str, FenceRecord]) -> None:
        items = list(fences.items())
        for i in range(0, len(items), _FENCES_PER_TXN):
            written = self.etcd.txn(
                [ModIs(gen_key(self.source), gen_rev)],
                [
                    Put(fence_key(self.source, s), f.encode())
                    for s, f in items[i : i + _FENCES_PER_TXN]
                ],
            )
            if not written.succeeded:
                raise RetryableError(f"target {self.name}: generation moved while writing fences")

    def write_progress(
        self,
        gen_rev: int,
        gen: int,
        rev: int,
        seen: Sequence[tuple[bytes, int]] = (),
        last: Witness | None = None,
        base: int = 0,
        listing: Listing | None = None,
    ) -> bool:
        """Record that the target holds every event up to *rev*, with writes of the source
        the watcher saw (key, revision), the newest event it took, the revision its
        watch began at, and what its last listing held while no event vouches for it: a
        new term reads them back in the source before it resumes from the fences
        (planner.progress_writes, planner.progress_vouch)."""
        value = encode_progress(gen, rev, seen, time.time(), last, base, listing)
        return self.etcd.txn(
            [ModIs(gen_key(self.source), gen_rev)], [Put(progress_key(self.source), value)]
        ).succeeded

    def write_canary(self, resource: Resource, gen_rev: int, lease: int = 0) -> bool:
        """Write the resource's canary while the generation record is the one opened at
        *gen_rev* (a target wiped, or taken over by another watcher's generation, since
        the fences were read must not get it); False if it was not."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()  # RFC 3339
        try:
            return self.etcd.txn(
                [ModIs(gen_key(self.source), gen_rev)],
                [Put(canary_key(self.source, resource), stamp, lease)],
            ).succeeded
        except LeaseGoneError:
            self.leases.forget(lease)
            raise

    def mark_held(self, held: bool) -> None:
        """Record (or clear) that deletes of this source were held for a source canary."""
        op: TxnOp = Put(held_key(self.source), b"1") if held else Delete(held_key(self.source))
        self.etcd.txn([], [op])

    def take_request(self, mod_revision: int) -> None:
        """Delete the resync request that was read, and only that one: a newer one stays."""
        self.etcd.txn(
            [ModIs(resync_key(self.source), mod_revision)], [Delete(resync_key(self.source))]
        )

    def clear_rejected(self) -> None:
        self.etcd.delete_prefix(rejected_prefix(self.source))

    def cache(self, resource: Resource) -> Iterator[KV]:
        """What the target caches of this resource of the source, in key order, a page at a
        time (the identities' whole per-cluster subtree, so old value keys are found)."""
        _, kvs = self.etcd.scan(
            resource.cache_scan_prefix(self.source), None, self.page, exact=resource.single_key
        )
        return kvs
