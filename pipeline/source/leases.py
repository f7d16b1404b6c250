"""Leases on cached keys (sync.cache_lease_ttl > 0), as Cilium's KVStoreMesh keeps them: every
key a worker puts sits on an etcd lease of the target, at most MAX_KEYS_PER_LEASE keys to a
lease, and the active watcher keeps them alive. If kvmesh goes away for good, the caches it
wrote expire after the TTL, as KVStoreMesh's do.

Each lease is recorded in the target (`kvmesh/<source>/leases/<id>`), so the next active
watcher, in this process or another, keeps alive the leases the last one granted; with
cache_lease_ttl back at 0 it still keeps them alive until a resync has moved every key off
them. A lease found gone took its keys with it: the target is owed a resync onto a new one.

The watcher knows which lease each cached key sits on (`where`) and counts the keys of each
lease, so that the number of leases follows the number of keys, not the number of writes.
A batch's puts all go on one lease: a key written again moves to it, and the lease it left
has room again. When the current lease is full, the next puts go on the emptiest lease with
at least half its room free, and only if there is none on a new one. The map is read with
the records at the start of every term (each lease's keys, from etcd: another watcher may
have moved keys meanwhile) and corrected from the target's listing at each resync, so it
follows the target even where batches never landed.

A lease that holds no key and is not the current one is retired, and revoked once no batch
that touched it can still land: every shard's fence has passed, done, the chain as it was
when the lease emptied (or the generation moved on, which makes older batches obsolete), and
etcd confirms it holds no key. Without the first condition a batch still queued could land
between the look and the revoke, and the revoke would delete its keys behind a fence that
had already moved. A retired lease takes no new key.

Keepalives run on a thread of their own (Watcher._keep_leases), so a long resync, a source
that cannot be reached, or a blocked main loop never lets the caches expire.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from pipeline.clients.etcd import Delete, EtcdClient, Put
from pipeline.protocol.errors import LeaseGoneError, RetryableError, TimedOutError
from pipeline.protocol.fence import Position
from pipeline.protocol.layout import canary_prefix
from pipeline.protocol.names import gen_key, lease_key, lease_prefix

log = logging.getLogger("kvmesh.leases")

MAX_KEYS_PER_LEASE = 1000  # as KVStoreMesh: revoking a lease deletes all its keys at once

# (generation, chain) when a lease emptied; None: found empty when the records were loaded
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
        self._load_lock = threading.Lock()  # one load at a time, whichever thread asks
        self.known: set[int] = set()  # recorded and, when last looked at, alive
        self.retired: dict[int, Retired] = {}  # known leases that hold no key: to revoke
        self.where: dict[bytes, int] = {}  # cached key -> the known lease it sits on
        self.count: dict[int, int] = {}  # known lease -> keys of `where` on it
        self.current = 0  # the lease new puts go on
        self.gone: set[int] = set()  # found ended: records kept until a resync rewrote keys
        self._term = 0  # counts reset()s: the records are read once per term
        self._loaded_term = -1
        self._seen: set[bytes] | None = None  # keys a resync's listing found (see relist)
        self._gone_before: set[int] = set()  # `gone` when the listing began
        self.lost = threading.Event()  # a lease was found gone: the target needs a resync

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    @property
    def tracking(self) -> bool:
        """Whether batches must be looked at: leases are on, or some are left to empty."""
        return self.enabled or bool(self.known)

    def mine(self, lease: int) -> bool:
        """Whether a key on *lease* is where this watcher wants it: on one of its current
        or retired leases, or (without leases) on none. A key on any other lease
        (KVStoreMesh's, an older run's) would vanish when that lease ends, so a resync
        writes it again."""
        with self._lock:
            return lease in self.known if self.enabled else lease == 0

    @property
    def loaded(self) -> bool:
        """Whether the records were read in this term."""
        return self._loaded_term == self._term

    def reset(self) -> None:
        """A new term: the records are read again before this term uses them (another
        watcher may have granted leases, and moved keys, since this one last did). It does
        not wait for a load under way on the keepalive thread: that one counts for the
        term it began in."""
        with self._lock:
            self._term += 1
            # a loss seen in an earlier term may be another's lease, revoked since: the
            # records tell (an ended lease keeps its record), and this term's load reads them
            self.lost.clear()

    def ensure_loaded(self, wait: float | None = None) -> None:
        """Load the records unless this term did already (the main loop at a term's start
        or a resync, the keepalive thread while the start still fails): never two loads
        at once, and none once the main loop has taken a lease from them. *wait* bounds
        the wait for a load under way on another thread (None: no bound); past it the
        target counts as not answering (TimedOutError), as a call of that long would."""
        if not self._load_lock.acquire(timeout=-1 if wait is None else wait):
            name = self.etcd.name
            raise TimedOutError(
                f"etcd {name}: its lease records are still being read by another thread "
                f"after {wait:g} s",
                name,
            )
        try:
            if not self.loaded:
                self.load()
        finally:
            self._load_lock.release()

    def load(self) -> bool:
        """Read the recorded leases and keep those alive, and which keys each holds (two
        calls per lease). Returns False if the target needs a resync: a recorded lease was
        gone (its keys with it), keys sit on leases while leases are off, or leases are on
        and the synced target has none yet. The record of an ended lease stays until a resync
        has rewritten its keys (settle), so that a load that fails half way, or a watcher
        that dies before the resync, leaves the next one the same evidence. Callers go
        through ensure_loaded, except tests."""
        with self._lock:
            term = self._term
        prefix = lease_prefix(self.source)
        found: dict[int, list[bytes]] = {}
        gone: set[int] = set()
        intact = True
        for key in self.etcd.keys(prefix):
            lease = parse_lease_id(key[len(prefix) :])
            if lease is None:
                self.etcd.delete(key)  # not a record kvmesh wrote
                continue
            keys = self.etcd.lease_keys(lease) if self.etcd.keepalive(lease) > 0 else None
            if keys is not None:
                found[lease] = keys
            else:
                log.warning("%s→%s: lease %x had ended", self.source, self.etcd.name, lease)
                self.lost.set()  # at once: a later call of this load may fail
                gone.add(lease)
                intact = False
        keyed = any(found.values())
        if not self.enabled and keyed:
            intact = False  # move every key off them, then they are revoked
        if self.enabled and not keyed and self.etcd.get(gen_key(self.source)) is not None:
            intact = False  # synced without leases before: put every key on one
        where = {k: lease for lease, keys in found.items() for k in keys}
        count = dict.fromkeys(found, 0)
        for lease in where.values():  # a key listed twice (it moved meanwhile) counts once
            count[lease] += 1
        with self._lock:
            self.known = set(found)
            self.where, self.count = where, count
            # empty: revoked at the next poll that finds it still empty (batches of an
            # earlier term cannot land once this term has opened its generation)
            self.retired = {lease: None for lease, n in count.items() if not n}
            self.current = 0
            self.gone = gone
            self._seen = None
            self._loaded_term = term
        if not intact:
            self.lost.set()  # the watcher resyncs this target
        return intact

    def take(
        self, puts: Sequence[bytes], deletes: Sequence[bytes], gen: int, chain: dict[str, Position]
    ) -> int:
        """The lease a batch's *puts* go on (0 without leases): the current one, or, once it
        would pass MAX_KEYS_PER_LEASE keys, the emptiest with half its room free, or a new
        one. Notes where the batch leaves each key. *gen* and *chain* are the pair's
        generation and chain with the batch in it (in a resync, its first positions: a
        shard's fence is done only once its last snapshot batch landed; settle stamps
        again): a lease it empties is retired with them."""
        with self._lock:
            if self._seen is not None:
                self._seen.update(puts)
            for key in deletes:
                self._retire(self._move(key, 0), gen, chain)
            lease = self._room(puts) if self.enabled and puts else 0
        if self.enabled and puts and not lease:
            lease = self.etcd.grant_lease(self.ttl)
            self.etcd.txn([], [Put(lease_key(self.source, lease), b"")])
            with self._lock:
                self.known.add(lease)
                self.count[lease] = 0
        with self._lock:
            if lease and lease != self.current:
                old, self.current = self.current, lease
                self._retire(old if self.count.get(old) == 0 else 0, gen, chain)
            for key in puts:
                self._retire(self._move(key, lease), gen, chain)
        return lease

    def _room(self, puts: Sequence[bytes]) -> int:
        """A known lease the keys of *puts* fit on, or 0 (with the lock held)."""
        current = self.current
        if current in self.count and current not in self.retired:
            where = self.where
            fresh = sum(1 for k in puts if where.get(k) != current)
            if self.count[current] + fresh <= MAX_KEYS_PER_LEASE:
                return current
        roomy = [
            (n, lease)
            for lease, n in self.count.items()
            if lease != current
            and lease not in self.retired
            and n + len(puts) <= MAX_KEYS_PER_LEASE // 2
        ]
        return min(roomy)[1] if roomy else 0

    def _move(self, key: bytes, lease: int) -> int:
        """*key* now sits on *lease* (0: none, or deleted), with the lock held. Returns the
        lease it left if that one now holds no key and is not the current one, else 0."""
        old = self.where.pop(key, 0) if lease == 0 else self.where.get(key, 0)
        if old == lease:
            return 0
        if lease in self.count:
            self.where[key] = lease
            self.count[lease] += 1
        elif lease:  # forgotten meanwhile (found gone): the resync it is owed places the key
            self.where.pop(key, None)
        if old in self.count:
            self.count[old] -= 1
            if not self.count[old] and old != self.current:
                return old
        return 0

    def _retire(self, lease: int, gen: int, chain: dict[str, Position]) -> None:
        """*lease* (if not 0) emptied with the batches up to *chain*: no new key goes on
        it, and it is revoked once they landed (with the lock held)."""
        if lease:
            self.retired[lease] = (gen, dict(chain))

    def relist(self) -> None:
        """A resync lists the target: `note` corrects the map from what it finds, and
        `settle` then drops what it did not find and retires the leases left empty. The
        counts are kept meanwhile, so that puts of the resync still see full leases."""
        with self._lock:
            self._seen = set()
            self._gone_before = set(self.gone)  # what this listing's resync rewrites

    def note(self, key: bytes, lease: int) -> None:
        """The target's listing found *key* on *lease*."""
        with self._lock:
            if lease not in self.count:  # not this watcher's: the key is written again
                self._move(key, 0)
                return
            if self._seen is not None:
                self._seen.add(key)
            self._move(key, lease)  # a lease it leaves empty is retired by settle
            self.retired.pop(lease, None)

    def settle(self, gen: int, chain: dict[str, Position] | None) -> None:
        """After a resync's listing (*chain*: with its batches; None: it failed, and the
        map keeps what it had): keys the listing did not find and the resync did not put
        are dropped (canaries are not listed, and stay), and every known lease left empty
        is retired, stamped with *chain*."""
        with self._lock:
            seen, self._seen = self._seen, None
            if chain is None or seen is None:
                return
            canaries = canary_prefix(self.source)
            for key in [k for k in self.where if k not in seen and not k.startswith(canaries)]:
                self._move(key, 0)
            for lease, n in self.count.items():
                if not n and lease != self.current:
                    self._retire(lease, gen, chain)
            gone = self._gone_before & self.gone
            self.gone -= gone
        for lease in gone:  # their keys are written again: the evidence may go
            self._drop_record(lease)

    def keep_alive(self) -> None:
        """Refresh every known lease (the keepalive thread). One found gone sets `lost`,
        unless a new term began meanwhile (its load looks again)."""
        with self._lock:
            leases, term = sorted(self.known), self._term
        for lease in leases:
            if self.etcd.keepalive(lease) > 0:
                continue
            with self._lock:
                if lease not in self.known or term != self._term:
                    continue  # revoked meanwhile (collect), forgotten, or another term's
            log.warning("%s→%s: lease %x ended", self.source, self.etcd.name, lease)
            self.lost.set()
            self.forget(lease)

    def check_current(self) -> None:
        """Before a resync: make sure the lease its keys will go on still exists."""
        with self._lock:
            current = self.current
        if current and self.etcd.keepalive(current) <= 0:
            log.warning("%s→%s: lease %x ended", self.source, self.etcd.name, current)
            self.forget(current)

    def collect(self, landed: Landed, gen: int, chain: dict[str, Position]) -> None:
        """Revoke retired leases once every batch that touched them has landed or can no
        longer land (*landed*(gen, chain) says, from the fences), and etcd says they hold
        no key. Keys etcd finds on one that the map does not know of are noted there (it is
        no longer retired); keys the map has elsewhere are on their way off, and the lease
        waits for the batches up to *gen* and *chain*, the pair's now, before another look."""
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
            with self._lock:
                if lease not in self.retired or lease not in self.count:
                    continue  # a resync's listing found keys on it meanwhile, or it went
                if keys:
                    for key in keys:
                        if key not in self.where:
                            self._move(key, lease)
                    if self.count[lease]:
                        del self.retired[lease]
                    else:
                        self._retire(lease, gen, chain)
                    continue
            # the record first: one left behind would read as a lease that ended, at the next
            # load, and cost a resync (the next poll tries again if this fails); then out of
            # the keepalive thread's sight, which must not take it for lost; then the revoke
            if not self._drop_record(lease):
                continue
            self._unknow(lease)
            try:
                self.etcd.revoke_lease(lease)
            except LeaseGoneError:
                pass  # gone already, if another watcher of an overlapping term revoked it
            except RetryableError as exc:  # no longer kept alive: it ends after its TTL
                log.warning(
                    "%s→%s: revoking lease %x failed: %s", self.source, self.etcd.name, lease, exc
                )

    def forget(self, lease: int) -> None:
        """*lease* was found ended: stop keeping it. Its record stays until a resync has
        rewritten what it took (see load), and is written again in case another watcher
        (an older term's, still running) took it for empty and deleted it."""
        self._unknow(lease)
        with self._lock:
            self.gone.add(lease)
        try:
            self.etcd.txn([], [Put(lease_key(self.source, lease), b"")])
        except RetryableError as exc:
            log.warning("%s→%s: writing lease record failed: %s", self.source, self.etcd.name, exc)

    def _unknow(self, lease: int) -> None:
        with self._lock:
            self.known.discard(lease)
            self.retired.pop(lease, None)
            if self.count.pop(lease, 0):  # gone with keys: the resync it is owed places them
                self.where = {k: v for k, v in self.where.items() if v != lease}
            if lease == self.current:
                self.current = 0

    def _drop_record(self, lease: int) -> bool:
        """Delete the record of *lease*; False if etcd did not answer."""
        try:
            self.etcd.txn([], [Delete(lease_key(self.source, lease))])
            return True
        except RetryableError as exc:
            log.warning("%s→%s: deleting lease record failed: %s", self.source, self.etcd.name, exc)
            return False
