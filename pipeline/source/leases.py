"""Leases on cached keys (sync.cache_lease_ttl > 0), as Cilium's KVStoreMesh keeps them: every
key a worker puts sits on an etcd lease of the target, at most MAX_KEYS_PER_LEASE puts to a
lease, and the active watcher keeps them alive. If kvmesh goes away for good, the caches it
wrote expire after the TTL, as KVStoreMesh's do.

Each lease is recorded in the target (`kvmesh/<source>/leases/<id>`), so the next active
watcher, in this process or another, keeps alive the leases the last one granted; with
cache_lease_ttl back at 0 it still keeps them alive until a resync has moved every key off
them. A lease found gone took its keys with it: the target is owed a resync onto a new one.

A lease that is no longer the current one is revoked once no key sits on it and no batch
stamped with it can still land: every shard's fence has passed, done, the chain as it was
when the lease was retired (or the generation moved on, which makes older batches obsolete).
Without that second condition a batch still queued could land between the look and the
revoke, and the revoke would delete its keys behind a fence that had already moved.

Keepalives run on a thread of their own (Watcher._keep_leases), so a long resync, a source
that cannot be reached, or a blocked main loop never lets the caches expire.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from pipeline.clients.etcd import Delete, EtcdClient, Put
from pipeline.protocol.errors import LeaseGoneError, RetryableError
from pipeline.protocol.fence import Position
from pipeline.protocol.names import gen_key, lease_key, lease_prefix

log = logging.getLogger("kvmesh.leases")

MAX_KEYS_PER_LEASE = 1000  # as KVStoreMesh: revoking a lease deletes all its keys at once

# (generation, chain) when a lease was retired; None: granted in an earlier term
Retired = tuple[int, dict[str, Position]] | None
Landed = Callable[[int, dict[str, Position]], bool]


def parse_lease_id(raw: bytes) -> int | None:
    """A lease ID as a record key spells it (lowercase hex), or None."""
    if not raw or len(raw) > 16 or any(c not in b"0123456789abcdef" for c in raw):
        return None
    lease = int(raw, 16)
    return lease if 0 < lease < 1 << 63 else None


class TargetLeases:
    """The leases of one source's cache in one target."""

    def __init__(self, etcd: EtcdClient, source: str, ttl: int) -> None:
        self.etcd, self.source, self.ttl = etcd, source, ttl
        self._lock = threading.Lock()
        self.known: set[int] = set()  # recorded and, when last looked at, alive
        self.retired: dict[int, Retired] = {}  # known leases new puts no longer go on
        self.current = 0  # the lease new puts go on
        self.assigned = 0  # puts sent on the current lease
        self.loaded = False  # the records were read in this process
        self.lost = threading.Event()  # a lease was found gone: the target needs a resync

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def mine(self, lease: int) -> bool:
        """Whether a key on *lease* is where this watcher wants it: on one of its current
        or retired leases, or (without leases) on none. A key on any other lease
        (KVStoreMesh's, an older run's) would vanish when that lease ends, so a resync
        writes it again."""
        with self._lock:
            return lease in self.known if self.enabled else lease == 0

    def load(self) -> bool:
        """Read the recorded leases and keep those alive. Returns False if the target needs
        a resync: a recorded lease was gone (its keys with it), keys sit on leases while
        leases are off, or leases are on and the synced target has none yet."""
        prefix = lease_prefix(self.source)
        found: set[int] = set()
        intact = True
        for key in self.etcd.keys(prefix):
            lease = parse_lease_id(key[len(prefix) :])
            if lease is None:
                self.etcd.delete(key)  # not a record kvmesh wrote
                continue
            if self.etcd.keepalive(lease) > 0:
                found.add(lease)
            else:
                log.warning("%s→%s: lease %x had ended", self.source, self.etcd.name, lease)
                self.etcd.delete(key)
                intact = False
        if not self.enabled and found:
            intact = False  # move every key off them, then they are revoked
        if self.enabled and not found and self.etcd.get(gen_key(self.source)) is not None:
            intact = False  # synced without leases before: put every key on one
        with self._lock:
            self.known = found
            self.retired = dict.fromkeys(found)
            self.current, self.assigned = 0, 0
            self.loaded = True
        if not intact:
            self.lost.set()  # the watcher resyncs this target
        return intact

    def take(self, puts: int, gen: int, chain: dict[str, Position]) -> int:
        """The lease for a batch of *puts* puts (0 without leases): the current one, or a new
        one once the current would pass MAX_KEYS_PER_LEASE. *gen* and *chain* are the pair's
        generation and chain now, recorded with the lease this one replaces."""
        if not self.enabled:
            return 0
        with self._lock:
            if self.current and self.assigned + puts <= MAX_KEYS_PER_LEASE:
                self.assigned += puts
                return self.current
        lease = self.etcd.grant_lease(self.ttl)
        self.etcd.txn([], [Put(lease_key(self.source, lease), b"")])
        with self._lock:
            if self.current:
                self.retired[self.current] = (gen, dict(chain))
            self.known.add(lease)
            self.current, self.assigned = lease, puts
        return lease

    def keep_alive(self) -> None:
        """Refresh every known lease (the keepalive thread). One found gone sets `lost`."""
        with self._lock:
            leases = sorted(self.known)
        for lease in leases:
            if self.etcd.keepalive(lease) > 0:
                continue
            log.warning("%s→%s: lease %x ended", self.source, self.etcd.name, lease)
            self.lost.set()
            self.forget(lease)

    def check_current(self) -> None:
        """Before a resync: make sure the lease its keys will go on still exists."""
        with self._lock:
            current = self.current
        if current and self.etcd.keepalive(current) <= 0:
            self.forget(current)

    def collect(self, landed: Landed) -> None:
        """Revoke retired leases no key sits on, once every batch stamped with them has
        landed or can no longer land (*landed*(gen, chain) says, from the fences)."""
        with self._lock:
            retired = list(self.retired.items())
        for lease, when in retired:
            if when is not None and not landed(*when):
                continue
            keys = self.etcd.lease_keys(lease)
            if keys is None:  # it ended, and took whatever sat on it
                self.lost.set()
                self.forget(lease)
                continue
            if keys:
                continue
            # gone already, if another watcher of an overlapping term revoked it
            with contextlib.suppress(LeaseGoneError):
                self.etcd.revoke_lease(lease)
            self.forget(lease)

    def forget(self, lease: int) -> None:
        with self._lock:
            self.known.discard(lease)
            self.retired.pop(lease, None)
            if lease == self.current:
                self.current, self.assigned = 0, 0
        try:
            self.etcd.txn([], [Delete(lease_key(self.source, lease))])
        except RetryableError as exc:  # the next load finds it gone and deletes it then
            log.warning("%s→%s: deleting lease record failed: %s", self.source, self.etcd.name, exc)
