"""An in-memory etcd behind kvmesh's EtcdClient interface, for unit tests of the watcher and
the workers: one keyspace with a revision per write, every key's history (so reads at an old
revision and watches from one work), compaction, compare-guarded transactions, watches and
progress notifications, a wipe (an etcd that comes back empty) and an outage.

Watches do not run on threads: a response waits in its stream until the test calls pump(),
which hands each stream at most one response (all its pending events, as etcd coalesces
them). Everything then happens in the order the test chooses.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.clients.etcd import (
    KV,
    Compare,
    Delete,
    Event,
    Get,
    Put,
    TxnOp,
    TxnResult,
    ValueIs,
    expand_writes,
    prefix_end,
)
from pipeline.protocol.errors import (
    CompactedError,
    LeaseGoneError,
    PermissionDeniedError,
    RequestTooLargeError,
    RetryableError,
    WatchDeniedError,
)

_cluster_ids = itertools.count(0x1000)


@dataclass
class _Version:
    revision: int
    value: bytes | None  # None: deleted at this revision
    lease: int = 0


@dataclass
class Keyspace:
    """The state one etcd cluster keeps, shared by every client of it."""

    name: str
    cluster_id: int = field(default_factory=lambda: next(_cluster_ids))
    revision: int = 1  # etcd starts at 1
    compacted: int = 0
    history: dict[bytes, list[_Version]] = field(default_factory=dict)
    sorted_keys: list[bytes] = field(default_factory=list)  # every key with a history
    log: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)  # (rev, key, value)
    streams: list[MemoryStream] = field(default_factory=list)
    down: bool = False
    max_request_bytes: int = 0  # 0: no limit
    leases: dict[int, int] = field(default_factory=dict)  # lease ID -> TTL (they never run out)
    next_lease: int = 0x7000

    def current(self, key: bytes) -> _Version | None:
        versions = self.history.get(key)
        if not versions or versions[-1].value is None:
            return None
        return versions[-1]

    def at(self, key: bytes, revision: int) -> _Version | None:
        versions = self.history.get(key, [])
        i = bisect.bisect_right([v.revision for v in versions], revision)
        if i == 0 or versions[i - 1].value is None:
            return None
        return versions[i - 1]

    def in_range(self, key: bytes, end: bytes | None) -> Iterator[bytes]:
        """Keys with a history from *key* up to *end* (None: only *key* itself)."""
        if end is None:
            if key in self.history:
                yield key
            return
        i = bisect.bisect_left(self.sorted_keys, key)
        while i < len(self.sorted_keys) and (end == b"\0" or self.sorted_keys[i] < end):
            yield self.sorted_keys[i]
            i += 1

    def write(self, key: bytes, value: bytes | None, lease: int = 0) -> None:
        if key not in self.history:
            bisect.insort(self.sorted_keys, key)
            self.history[key] = []
        self.history[key].append(_Version(self.revision, value, lease))
        self.log.append((self.revision, key, value))


class MemoryStream:
    def __init__(
        self,
        space: Keyspace,
        key: bytes,
        end: bytes | None,
        start_revision: int,
        on_events: Callable[[list[Event], int], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.space = space
        self.key, self.end = key, end
        self.next_rev = max(start_revision, 1)  # events from here on are still owed
        self.on_events, self.on_error = on_events, on_error
        self.progress_asked = False
        self.stopped = False
        self.refused = False  # cancelled for lack of permission at its next pump

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        return key >= self.key and (self.end == b"\0" or key < self.end)

    def request_progress(self) -> None:
        self.progress_asked = True

    def stop(self) -> None:
        self.stopped = True

    def pump(self) -> bool:
        """Deliver one response, if one is owed; returns whether one was."""
        if self.stopped:
            return False
        space = self.space
        if space.down:
            self.stopped = True
            self.on_error(RetryableError(f"etcd {space.name}: unavailable", space.name))
            return True
        if self.refused:
            self.stopped = True
            self.on_error(
                WatchDeniedError(
                    f"etcd {space.name}: watch canceled: etcdserver: permission denied",
                    space.name,
                )
            )
            return True
        if self.next_rev < space.compacted:
            self.stopped = True
            self.on_error(CompactedError(space.compacted))
            return True
        i = bisect.bisect_left(space.log, self.next_rev, key=lambda e: e[0])
        events: list[Event] = []
        last, index = -1, 0
        for rev, key, value in space.log[i:]:
            if not self.matches(key):
                continue
            index = index + 1 if rev == last else 0
            last = rev
            events.append(Event(rev, index, key, value))
        self.next_rev = space.revision + 1
        if not events and not self.progress_asked:
            return False
        self.progress_asked = False
        self.on_events(events, space.revision)
        return True


class MemoryEtcd:
    """One client of a Keyspace (a new one per client; several share a keyspace)."""

    def __init__(self, space: Keyspace | str, read_only: bool = False) -> None:
        self.space = space if isinstance(space, Keyspace) else Keyspace(space)
        self.name = self.space.name
        self.read_only = read_only
        self.writes = 0  # transactions with a write that this client committed
        self.lease_looks = 0  # lease_keys calls on this client
        # prefixes this client's role may not read: reads refused, watches cancelled
        self.unreadable: tuple[bytes, ...] = ()

    def reader(self) -> MemoryEtcd:
        """A client of the same keyspace that refuses every write (a `read` role user)."""
        return MemoryEtcd(self.space, read_only=True)

    # -- test controls -----------------------------------------------------------------------

    def pump(self) -> int:
        """Deliver what every open watch owes, one response per stream; returns how many."""
        self.space.streams = [s for s in self.space.streams if not s.stopped]
        return sum(s.pump() for s in list(self.space.streams))

    def compact(self, revision: int | None = None) -> None:
        self._check()
        self.space.compacted = self.space.revision if revision is None else revision

    def wipe(self, same_cluster_id: bool = True) -> None:
        """The etcd comes back empty (its data dir lost): revision 1, no history. With the
        same member names an etcd keeps its cluster ID, so that is the default."""
        old = self.space
        fresh = Keyspace(old.name, old.cluster_id if same_cluster_id else next(_cluster_ids))
        self.restart()
        old.__dict__.update(fresh.__dict__)

    def rewind(self, revision: int) -> None:
        """The etcd comes back without the end of its history: everything after *revision*
        is gone (a crash that lost writes not yet flushed, or a data dir restored from a
        copy). Same cluster ID; the next writes take the lost revisions again."""
        space = self.space
        self.restart()
        for key in list(space.history):
            kept = [v for v in space.history[key] if v.revision <= revision]
            if kept:
                space.history[key] = kept
            else:
                del space.history[key]
                space.sorted_keys.remove(key)
        space.log = [e for e in space.log if e[0] <= revision]
        space.revision = revision
        space.compacted = min(space.compacted, revision)

    def restart(self) -> None:
        """The etcd restarts (with its data, unless wiped): every stream breaks."""
        for s in self.space.streams:
            s.stopped = True
            s.on_error(RetryableError(f"etcd {self.space.name}: connection reset", self.space.name))
        self.space.streams = []

    def set_down(self, down: bool) -> None:
        self.space.down = down

    def items(self, prefix: bytes) -> dict[bytes, bytes]:
        """The live keys under *prefix* and their values (a test's view, not a client call)."""
        out = {}
        for key in self.space.in_range(prefix, prefix_end(prefix)):
            v = self.space.current(key)
            if v is not None:
                assert v.value is not None
                out[key] = v.value
        return out

    # -- EtcdClient --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.space.down:
            raise RetryableError(f"etcd {self.name}: unavailable", self.name)

    def close(self) -> None:
        pass

    def patience(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """Calls here never wait: nothing to shorten."""
        return contextlib.nullcontext()

    def header(self) -> tuple[int, int]:
        self._check()
        # as Etcd.header: a count-only read of a key the role may read (for `read`, its own
        # cluster's config)
        self._may_read(b"cilium/cluster-config/" + self.name.encode())
        return self.space.revision, self.space.cluster_id

    def revision(self) -> int:
        return self.header()[0]

    def _may_read(self, key: bytes) -> None:
        if key.startswith(self.unreadable) and self.unreadable:
            raise PermissionDeniedError(
                f"etcd {self.name}: range failed: StatusCode.PERMISSION_DENIED: "
                "etcdserver: permission denied",
                self.name,
            )

    def get(self, key: bytes) -> KV | None:
        self._check()
        self._may_read(key)
        v = self.space.current(key)
        if v is None or v.value is None:
            return None
        return KV(key, v.value, v.revision, v.lease)

    def count(self, prefix: bytes, revision: int | None = None, exact: bool = False) -> int:
        self._check()
        if revision is None and not exact:
            return len(self.items(prefix))
        _, kvs = self.scan(prefix, revision, exact=exact)
        return sum(1 for _ in kvs)

    def latest_change(
        self, prefix: bytes, after: int, exact: bool = False, revision: int | None = None
    ) -> int:
        self._check()
        if revision is not None:
            _, kvs = self.scan(prefix, revision, exact=exact)
            return max((kv.mod_revision for kv in kvs if kv.mod_revision > after), default=0)
        end = None if exact else prefix_end(prefix)
        revs = [
            v.revision
            for k in self.space.in_range(prefix, end)
            if (v := self.space.current(k)) is not None and v.revision > after
        ]
        return max(revs, default=0)

    def scan(
        self, prefix: bytes, revision: int | None = None, page: int = 2000, exact: bool = False
    ) -> tuple[int, Iterator[KV]]:
        self._check()
        self._may_read(prefix)
        space = self.space
        rev = revision or space.revision
        if rev < space.compacted and revision is not None:
            raise CompactedError(rev)
        if rev > space.revision:
            raise RetryableError(f"etcd {self.name}: revision {rev} is in the future", self.name)
        end = None if exact else prefix_end(prefix)
        keys = list(space.in_range(prefix, end))

        def pages() -> Iterator[KV]:
            for i, key in enumerate(keys):
                if i and i % max(1, page) == 0:
                    self._check()  # each page is a request of its own
                v = space.at(key, rev)
                if v is not None and v.value is not None:
                    yield KV(key, v.value, v.revision, v.lease)

        return rev, pages()

    def keys(self, prefix: bytes, page: int = 2000) -> list[bytes]:
        self._check()
        return list(self.items(prefix))

    def exists(self, key: bytes, revision: int | None = None) -> bool:
        _, kvs = self.scan(key, revision, exact=True)
        return next(kvs, None) is not None

    def txn(
        self, compares: Sequence[Compare], ops: Sequence[TxnOp], failure: Sequence[Get] = ()
    ) -> TxnResult:
        self._check()
        space = self.space
        ops = expand_writes(ops)  # etcd counts and checks every key of a Writes
        writes = [op for op in ops if not isinstance(op, Get)]
        if writes and self.read_only:
            raise RetryableError(f"etcd {self.name}: permission denied", self.name)
        if max(len(compares), len(ops), len(failure)) > 128:  # etcd's --max-txn-ops, per list
            raise RetryableError(f"etcd {self.name}: too many operations in txn request")
        size = sum(len(op.key) + len(op.value) for op in ops if isinstance(op, Put))
        if space.max_request_bytes and size > space.max_request_bytes:
            raise RequestTooLargeError(f"etcd {self.name}: request is too large")
        single = [op.key for op in writes if not (isinstance(op, Delete) and op.prefix)]
        if len(single) != len(set(single)):
            raise RetryableError(f"etcd {self.name}: duplicate key given in txn request")
        for c in compares:
            v = space.current(c.key)
            if isinstance(c, ValueIs):
                held = v is not None and v.value == c.value
            else:
                held = (v.revision if v is not None else 0) == c.revision
            if not held:
                return TxnResult(False, space.revision, [self.get(g.key) for g in failure])
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in space.leases:
                raise LeaseGoneError(f"etcd {self.name}: etcdserver: requested lease not found")
        changes: list[tuple[bytes, bytes | None, int]] = []
        reads: list[KV | None] = []
        for op in ops:
            if isinstance(op, Get):
                reads.append(self.get(op.key))
            elif isinstance(op, Put):
                changes.append((op.key, op.value, op.lease))
            else:
                end = prefix_end(op.key) if op.prefix else None
                for key in list(space.in_range(op.key, end)):
                    if space.current(key) is not None:
                        changes.append((key, None, 0))
        if changes:
            space.revision += 1
            self.writes += 1
            for key, value, lease in changes:
                space.write(key, value, lease)
        return TxnResult(True, space.revision, reads)

    # -- leases (they never run out by themselves: a test expires one with revoke_lease)

    def grant_lease(self, ttl: int) -> int:
        self._check()
        if self.read_only:
            raise RetryableError(f"etcd {self.name}: permission denied", self.name)
        self.space.next_lease += 1
        self.space.leases[self.space.next_lease] = ttl
        return self.space.next_lease

    def keepalive(self, lease_id: int) -> int:
        self._check()
        return self.space.leases.get(lease_id, 0)

    def _on_lease(self, lease_id: int) -> list[bytes]:
        return [
            k
            for k in self.space.sorted_keys
            if (v := self.space.current(k)) is not None and v.lease == lease_id
        ]

    def lease_keys(self, lease_id: int) -> list[bytes] | None:
        self._check()
        self.lease_looks += 1
        if lease_id not in self.space.leases:
            return None
        return self._on_lease(lease_id)

    def revoke_lease(self, lease_id: int) -> None:
        """The lease goes, and every key on it (as when it expires)."""
        self._check()
        if lease_id not in self.space.leases:
            raise LeaseGoneError(f"etcd {self.name}: etcdserver: requested lease not found")
        keys = self._on_lease(lease_id)
        self.space.leases.pop(lease_id, None)
        if keys:
            self.space.revision += 1
            for key in keys:
                self.space.write(key, None)

    def put(self, key: bytes, value: bytes) -> None:
        self.txn([], [Put(key, value)])

    def delete(self, key: bytes) -> None:
        self.txn([], [Delete(key)])

    def delete_prefix(self, prefix: bytes) -> None:
        self.txn([], [Delete(prefix, prefix=True)])

    def watch(
        self,
        prefix: bytes,
        start_revision: int,
        on_events: Callable[[list[Event], int], None],
        on_error: Callable[[BaseException], None],
        exact: bool = False,
    ) -> MemoryStream:
        stream = MemoryStream(
            self.space,
            prefix,
            None if exact else prefix_end(prefix),
            start_revision,
            on_events,
            on_error,
        )
        if prefix.startswith(self.unreadable) and self.unreadable:
            # etcd cancels it at once (here, at the next pump)
            stream.refused = True
        self.space.streams.append(stream)
        return stream


class MemoryMesh:
    """A keyspace per cluster, and the factory a Watcher takes to reach them: the `read`
    role gets a client that refuses writes."""

    def __init__(self, *names: str) -> None:
        self.clusters = {n: MemoryEtcd(n) for n in names}

    def __getitem__(self, name: str) -> MemoryEtcd:
        return self.clusters[name]

    def factory(self, cluster: object, timeout: float, role: str) -> MemoryEtcd:
        etcd = self.clusters[getattr(cluster, "name")]  # noqa: B009
        return etcd.reader() if role == "read" else MemoryEtcd(etcd.space)

    def pump(self) -> int:
        return sum(c.pump() for c in self.clusters.values())
