"""A resync: list the source at one revision R and publish, for each target, only what
differs from what it caches, deletes included, while both are still being read.

It is a merge of sorted range scans, one resource at a time: the source's listing (rewritten
to target keys, which keeps the order) against each target's cache, page by page. Nothing of
either side is kept beyond a page per scan and a batch per shard, so a resync's memory grows
with the number of targets, not with the number of keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.clients.etcd import EtcdClient
from pipeline.protocol.errors import BadInputError, RetryableError
from pipeline.protocol.layout import RESOURCES, Layout, Resource, SourceCaps
from pipeline.protocol.sharding import shard_namer
from pipeline.protocol.snapshot import Merger, SnapshotCutter
from pipeline.protocol.wire import Batch
from pipeline.source.listing import Readiness, iter_resource
from pipeline.source.targets import TargetControl

log = logging.getLogger("kvmesh.resync")

PUBLISH_EVERY = 32  # batches gathered per target before they are published
# ... except at the start, when the workers have nothing to do yet: the first publish goes
# at this many (two tasks of full batches, MAX_OPS_PER_TASK), the next at twice as many,
# and so on up to PUBLISH_EVERY (a resource's forced last publish is no step)
PUBLISH_FIRST = 8


@dataclass
class Snapshot:
    """One target's side of a resync."""

    control: TargetControl
    cutter: SnapshotCutter
    publish: Callable[[list[Batch]], None]  # raises RetryableError when the broker refuses
    failed: str = ""  # why this target's snapshot stopped (then it stays owed a resync)
    held: int = 0  # keys only the target holds, kept while their source canary is missing
    outbox: list[Batch] = field(default_factory=list)
    gather: int = PUBLISH_FIRST  # batches gathered before the next publish

    def send(self, batches: Sequence[Batch], force: bool = False) -> None:
        if self.failed:  # nothing more is published for this target: its batches go
            return
        self.outbox.extend(batches)
        if not self.outbox or (len(self.outbox) < self.gather and not force):
            return
        if not force:  # a resource's last batches do not count as the ramp's steps
            self.gather = min(PUBLISH_EVERY, 2 * self.gather)
        try:
            self.publish(self.outbox)
        except RetryableError as exc:
            self.fail(f"publishing the snapshot failed: {exc}")
        self.outbox = []

    def fail(self, why: str) -> None:
        if not self.failed:
            self.failed = why
            log.warning("%s→%s: %s", self.control.source, self.control.name, why)


def _cache(snapshot: Snapshot, res: Resource) -> Iterator[tuple[bytes, bytes | None]]:
    """The target's cache of one resource; a target that fails mid-way just stops (its
    snapshot is marked failed and its remaining differences are not published). A key on
    a lease that is not the watcher's comes without its value: it differs whatever it
    holds, so it is written again where it belongs."""
    leases = snapshot.control.leases
    mine, note = leases.mine, leases.note if leases.tracking else None
    try:
        for kv in snapshot.control.cache(res):
            if note and kv.lease:
                note(kv.key, kv.lease)
            yield kv.key, kv.value if mine(kv.lease) else None
    except RetryableError as exc:
        snapshot.fail(f"listing the target failed: {exc}")


def run(
    source: EtcdClient,
    layout: Layout,
    revision: int,
    snapshots: list[Snapshot],
    *,
    shard_count: int,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
    keep_going: Callable[[], bool],
    readiness: Readiness | None = None,
    on_listed: Callable[[Resource], object] = lambda _res: None,
    newest: dict[str, tuple[bytes, int]] | None = None,
    tally: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Merge the source at *revision* into every snapshot, the targets' caches advancing in
    step with one listing of the source. Raises RetryableError if the source cannot be
    listed, or if *keep_going* (asked now and then) says stop: the lease was lost.

    *readiness* (what the source advertises at *revision*) decides per resource: one the
    source does not sync is drained (listed as empty); one still waiting for its source
    canary loses nothing (its deletes are held; so are the cluster config's while any
    resource waits). Each resource's shards are closed as soon as it is listed, and
    *on_listed* is called, so its canary need not wait for the rest."""
    ready = readiness or Readiness(SourceCaps(), False)
    waiting = ready.waiting()
    listed = 0
    for res in RESOURCES:
        hold = res.name in waiting or (res.single_key and bool(waiting))
        mergers = [Merger(_cache(snap, res)) for snap in snapshots]
        shard_of = shard_namer(res, shard_count)
        rows: Iterator[tuple[bytes, bytes]] = iter(())
        if ready.caps.syncs(res):
            rows = iter_resource(
                source,
                layout,
                res,
                revision,
                page=page,
                max_bytes=max_bytes,
                on_reject=on_reject,
                newest=newest,
                tally=tally,
            )
        for key, value in rows:
            for snap, merger in zip(snapshots, mergers, strict=True):
                if not snap.failed:
                    _feed(snap, merger.push(key, value), shard_of, hold)
            listed += 1
            if listed % 5000 == 0 and not keep_going():
                raise RetryableError("lost the lease during a resync")
        for snap, merger in zip(snapshots, mergers, strict=True):
            if not snap.failed:
                _feed(snap, merger.rest(), shard_of, hold)
                snap.send(snap.cutter.finish(res.name), force=True)
        on_listed(res)
    for snap in snapshots:
        snap.send(snap.cutter.finish(), force=True)


def _feed(
    snap: Snapshot,
    differences: Iterable[tuple[bytes, bytes | None, bool]],
    shard_of: Callable[[bytes], str],
    hold: bool,
) -> None:
    for key, value, missing in differences:
        if value is None:
            if hold:
                snap.held += 1
                continue
            batches = snap.cutter.delete(key, shard_of(key))
        else:
            batches = snap.cutter.put(key, value, shard_of(key), missing)
        if batches:
            snap.send(batches)
            if snap.failed:
                return
