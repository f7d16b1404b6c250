"""Leases on cached keys (sync.cache_lease_ttl > 0), as Cilium's KVStoreMesh keeps them: every
key a worker puts sits on an etcd lease of the target, at most MAX_KEYS_PER_LEASE puts to a
lease, and the active watcher keeps them alive. If kvmesh goes away for good, the caches it
wrote expire after the TTL, as KVStoreMesh's do.

Each lease is recorded in the target (`kvmesh/<source>/leases/<id>`), so the next active
watcher, in this process or another, keeps alive the leases the last one granted. A lease
found gone took its keys with it: the target is owed a resync onto a new lease. A lease no
key sits on any more (its keys were all written again onto newer leases, or deleted) is
revoked.
"""

from __future__ import annotations

import logging

from pipeline.clients.etcd import Delete, EtcdClient, Put
from pipeline.protocol.names import lease_key, lease_prefix

log = logging.getLogger("kvmesh.leases")

MAX_KEYS_PER_LEASE = 1000  # as KVStoreMesh: revoking a lease deletes all its keys at once


class TargetLeases:
    """The leases of one source's cache in one target (none when ttl is 0)."""

    def __init__(self, etcd: EtcdClient, source: str, ttl: int) -> None:
        self.etcd, self.source, self.ttl = etcd, source, ttl
        self.known: set[int] = set()  # recorded and, when last looked at, alive
        self.current = 0  # the lease new puts go on
        self.assigned = 0  # puts sent on the current lease
        self._next_round = 0.0
        self.loaded = False  # the records were read in this term

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def mine(self, lease: int) -> bool:
        """Whether a key on *lease* is where this watcher wants it: on one of its leases,
        or (without leases) on none. A key on any other lease (KVStoreMesh's, an older
        run's) would vanish when that lease ends, so a resync writes it again."""
        return lease in self.known if self.enabled else lease == 0

    def load(self) -> bool:
        """At the start of a term: read the recorded leases and keep those alive. Returns
        False if one was gone (its keys went with it: the target needs a resync)."""
        if not self.enabled:
            return True
        prefix = lease_prefix(self.source)
        self.known, self.current, self.assigned = set(), 0, 0
        self.loaded = False
        intact = True
        for key in self.etcd.keys(prefix):
            try:
                lease = int(key[len(prefix) :], 16)
            except ValueError:
                self.etcd.delete(key)
                continue
            if self.etcd.keepalive(lease) > 0:
                self.known.add(lease)
            else:
                log.warning("%s→%s: lease %x expired", self.source, self.etcd.name, lease)
                self.etcd.delete(key)
                intact = False
        self.loaded = True
        return intact

    def take(self, puts: int) -> int:
        """The lease for a batch of *puts* puts (0 without leases): the current one, or a new
        one once the current would pass MAX_KEYS_PER_LEASE."""
        if not self.enabled:
            return 0
        if not self.current or self.assigned + puts > MAX_KEYS_PER_LEASE:
            lease = self.etcd.grant_lease(self.ttl)
            self.etcd.txn([], [Put(lease_key(self.source, lease), b"")])
            self.known.add(lease)
            self.current, self.assigned = lease, 0
        self.assigned += puts
        return self.current

    def keep_alive(self, now: float) -> bool:
        """Refresh every lease once a third of the TTL has passed since the last round;
        revoke those no key sits on. Returns False if one was gone (a resync is owed)."""
        if not self.enabled or now < self._next_round:
            return True
        intact = True
        for lease in sorted(self.known):
            if self.etcd.keepalive(lease) > 0:
                if lease != self.current and self.etcd.lease_keys(lease) == 0:
                    self.etcd.revoke_lease(lease)
                    self._forget(lease)
                continue
            log.warning("%s→%s: lease %x expired", self.source, self.etcd.name, lease)
            self._forget(lease)
            intact = False
        self._next_round = now + self.ttl / 3  # after a failure, the next tick tries again
        return intact

    def check_current(self) -> None:
        """Before a resync: make sure the lease its keys will go on still exists (a worker
        that found it gone is why many resyncs happen)."""
        if self.current and self.etcd.keepalive(self.current) <= 0:
            self._forget(self.current)

    def lost(self, lease: int) -> None:
        """A write found *lease* gone."""
        if lease in self.known:
            self._forget(lease)

    def _forget(self, lease: int) -> None:
        self.known.discard(lease)
        if lease == self.current:
            self.current, self.assigned = 0, 0
        self.etcd.txn([], [Delete(lease_key(self.source, lease))])
