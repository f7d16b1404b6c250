"""What the watcher decides about one target, as pure functions of what it read there.

    read_records(raw, ...)        the target's kvmesh records, decoded as untrusted input
    plan_start(records, facts)    resume from the fences, or resync (and why)
    assess(records, pair, now)    one fence poll: a resync owed, a resync request to answer,
                                  stalled shards, canaries to write, progress to record

No I/O and no clock read: the watcher feeds them and carries out what they return, and the
stateful property test drives them directly (tests/unit/test_fence_stateful.py).
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from pipeline.protocol.errors import CorruptRecordError, MalformedBatchError
from pipeline.protocol.fence import FenceRecord, GenRecord, Position
from pipeline.protocol.layout import RESOURCE_BY_NAME, RESOURCES
from pipeline.protocol.names import (
    draining_key,
    fence_key,
    gen_key,
    held_key,
    progress_key,
    resync_key,
)
from pipeline.protocol.sharding import shard_resource
from pipeline.protocol.wire import Signer

END = 1 << 31  # an index past every event of a revision: (rev, END) covers all of rev
_DAY_MS = 86_400_000


class Cause(StrEnum):
    """Why a target is owed a resync. STABLE API: the `reason` label of
    kvmesh_watcher_resyncs_total, which operators alert on."""

    START = "start"  # a term begins and the target has not been assessed yet
    NO_GENERATION = "no_generation"  # the target holds no generation record of this source
    SETTINGS_CHANGED = "settings_changed"  # shards or identities mode differ from the record
    SOURCE_REPLACED = "source_replaced"  # the source etcd is another cluster, or lost history
    FENCES_INCOMPLETE = "fences_incomplete"  # a fence is missing, older, or inside a snapshot
    FENCES_AHEAD = "fences_ahead"  # a fence is past the source's revision
    TARGET_UNAVAILABLE = "target_unavailable"  # the target could not be reached at start
    TARGET_WIPED = "target_wiped"  # the target lost its kvmesh records while synced
    UNRECORDED = "unrecorded"  # batches landed past the last term's progress record
    GENERATION_MOVED = "generation_moved"  # another watcher opened a newer generation
    REQUESTED = "requested"  # a worker asked for it (a stalled chain or a lost record)
    STALLED = "stalled"  # a shard behind, its fence still, the queue empty: lost tasks
    ANTI_ENTROPY = "anti_entropy"  # the periodic resync (sync.resync_interval)
    COMPACTED = "compacted"  # the source's history was compacted past the watch
    CORRUPT_RECORD = "corrupt_record"  # a kvmesh record in the target does not decode
    SOURCE_CANARY = "source_canary"  # a resource's source canary appeared: send held deletes
    SOURCE_CONFIG = "source_config"  # the source's capabilities changed what is synced
    LEASE_EXPIRED = "lease_expired"  # a lease of cached keys ended, and its keys with it
    OUTBOX_FULL = "outbox_full"  # too many changes (or bytes) held while publishing was paused
    DRAINING = "draining"  # a watcher whose config lacks this source began draining it


@dataclass(frozen=True)
class Request:
    """A resync request found in the target: the generation it names (None: it is not one
    a worker of this mesh wrote) and its mod revision (to delete exactly that one)."""

    gen: int | None
    mod_revision: int


@dataclass(frozen=True)
class TargetRecords:
    """The kvmesh records of one source in one target. A record that does not decode, or
    names a generation more than a day ahead of the clock, makes `corrupt` say which."""

    gen: GenRecord | None
    gen_rev: int  # its mod revision, 0 when absent (the compare of every write)
    fences: dict[str, FenceRecord]
    progress: bytes | None
    request: Request | None
    corrupt: str = ""
    held: bool = False  # deletes were held for a missing source canary (names.held_key)
    # a drain of this source began (names.draining_key): its record's mod revision, 0 when
    # there is none (opening a generation deletes it under that compare)
    draining_rev: int = 0


def read_records(
    raw: Mapping[bytes, tuple[bytes, int]],
    source: str,
    shards: list[str],
    signer: Signer | None,
    now_ms: int,
) -> TargetRecords:
    """Decode the records under `kvmesh/<source>/`, given as key -> (value, mod revision)."""
    corrupt = ""
    gen: GenRecord | None = None
    gen_raw = raw.get(gen_key(source))
    if gen_raw is not None:
        try:
            gen = _plausible(GenRecord.decode(gen_raw[0]), now_ms)
        except CorruptRecordError as exc:
            corrupt = f"generation record: {exc}"
    fences: dict[str, FenceRecord] = {}
    for shard in shards:
        f = raw.get(fence_key(source, shard))
        if f is not None:
            try:
                fences[shard] = _plausible(FenceRecord.decode(f[0]), now_ms)
            except CorruptRecordError as exc:
                corrupt = corrupt or f"fence of {shard}: {exc}"
    req = raw.get(resync_key(source))
    progress = raw.get(progress_key(source))
    held = held_key(source) in raw
    draining = raw.get(draining_key(source))
    return TargetRecords(
        gen=gen,
        gen_rev=gen_raw[1] if gen_raw is not None else 0,
        fences=fences,
        progress=progress[0] if progress is not None else None,
        request=Request(_request_gen(req[0], signer), req[1]) if req is not None else None,
        corrupt=corrupt,
        held=held,
        draining_rev=draining[1] if draining is not None else 0,
    )


_R = TypeVar("_R", GenRecord, FenceRecord)


def _plausible(record: _R, now_ms: int) -> _R:
    """A record whose generation is more than a day ahead of the clock was not opened by a
    watcher (each is at least the time in ms, plus one per bump): taking it would make every
    new generation follow it, up to where the wire format ends."""
    if record.gen > now_ms + _DAY_MS:
        raise CorruptRecordError(f"generation {record.gen} is ahead of the clock")
    return record


def _request_gen(raw: bytes, signer: Signer | None) -> int | None:
    """The generation a resync request names, or None if it is not a request a worker of
    this mesh wrote (workers sign their requests as watchers sign tasks)."""
    try:
        request = json.loads(raw) if len(raw) <= 4096 else None
        if not isinstance(request, dict):
            return None
        if signer is not None:
            signer.verify(request)
        gen = request["gen"]
    except (MalformedBatchError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and gen > 0 else None


def progress_rev(raw: bytes | None, gen: int, source_rev: int) -> int:
    """The revision a progress record of generation *gen* vouches for, or 0 when there is
    none that can be believed (corrupt, of another generation, or past the source)."""
    if raw is None or len(raw) > 4096:
        return 0
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(record, dict) or record.get("gen") != gen:
        return 0
    rev = record.get("rev")
    if not isinstance(rev, int) or isinstance(rev, bool) or not 0 <= rev <= source_rev:
        return 0
    return rev


@dataclass(frozen=True)
class Witness:
    """The newest source event a watcher took: *key* was written (deleted, when *deleted*)
    at *revision*. A source etcd's history is lost from some revision on when it is (a
    crash that loses what it had not flushed, a data dir restored from a copy), so the
    same etcd still showing this write vouches for every event up to it."""

    key: bytes
    revision: int
    deleted: bool
    digest: str = ""  # of the value a put wrote (value_digest): the same key written again
    # at the same revision, with another value, is another history too


@dataclass(frozen=True)
class Listing:
    """What a resync listed of the source at *revision*: per resource read to its end, how
    many keys its range held and the newest mod revision among them. A history lost from
    between that write and *revision* and written anew shows another count, or a newer
    write, at *revision*; no write the watcher took vouches for those revisions until it
    takes one past them."""

    revision: int
    tally: dict[str, tuple[int, int]]


def value_digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=8).hexdigest()


class Unknown:
    """A progress record of this generation written before records named the newest
    event: it is believed as such records were."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = Unknown()


class Unvouched:
    """A progress record that vouches for nothing past the writes it names: none at all,
    one of another generation, one that does not decode, or one whose term took an event
    it could not name (a key too long to keep)."""

    def __repr__(self) -> str:
        return "UNVOUCHED"


UNVOUCHED = Unvouched()


@dataclass(frozen=True)
class Vouch:
    """What a progress record vouches for: the newest event its term took (if it took
    one), else every event up to *base* (where its term's watch began: a listing's
    revision, or a resume point vouched for by the term before)."""

    last: Witness | None
    base: int
    # what the listing its term began with held, while no event past it vouches for it
    listing: Listing | None = None

    @property
    def revision(self) -> int:
        """The revision up to which the record vouches for the source's history: the
        newest event's, or past it up to *base* as far as the listing, read back, goes (a
        target resynced after that event, at a listing nothing synced changed after);
        *base* with no event."""
        if self.last is None:
            return self.base
        if self.listing is None:
            return self.last.revision
        return max(self.last.revision, min(self.base, self.listing.revision))


def encode_progress(
    gen: int,
    rev: int,
    seen: Sequence[tuple[bytes, int]],
    ts: float,
    last: Witness | None = None,
    base: int = 0,
    listing: Listing | None = None,
) -> bytes:
    """A progress record: generation *gen* holds every event up to *rev*; *seen* are
    writes of the source its watcher saw (key, revision), at most 8, keys of up to 256
    bytes (what progress_writes believes, and what keeps the record under 4 KiB); *last*
    the newest event it took (None: none since its watch began at *base*; false in the
    record when its key is too long to keep); *listing* what the last listing held, when
    no event past it vouches for it."""
    kept = [(k, m) for k, m in seen if 0 < len(k) <= 256][:8]
    named: list[object] | bool | None = None
    if last is not None:
        named = len(last.key) <= 256 and [
            binascii.b2a_base64(last.key, newline=False).decode(),
            last.revision,
            last.deleted,
            last.digest,
        ]
    record = {
        "gen": gen,
        "rev": rev,
        "ts": ts,
        "seen": [[binascii.b2a_base64(k, newline=False).decode(), m] for k, m in kept],
        "last": named,  # [key, revision, deleted, digest]
        "base": base,
        # [revision, [[resource, keys, newest mod revision], ...]]
        "listing": listing
        and [listing.revision, [[n, c, t] for n, (c, t) in sorted(listing.tally.items())]],
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _revision(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def progress_vouch(raw: bytes | None, gen: int) -> Vouch | Unknown | Unvouched:
    """What a progress record of generation *gen* vouches for (Vouch), UNKNOWN for a record
    of this generation from a watcher that did not name the newest event, or UNVOUCHED."""
    if raw is None or len(raw) > 4096:
        return UNVOUCHED
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return UNVOUCHED
    if not isinstance(record, dict) or record.get("gen") != gen:
        return UNVOUCHED
    if "last" not in record:
        return UNKNOWN
    last, base = record["last"], record.get("base")
    if not _revision(base):
        return UNVOUCHED
    assert isinstance(base, int)
    listing = _listing(record.get("listing"))
    if listing is False:
        return UNVOUCHED
    assert not isinstance(listing, bool)
    if last is None:
        return Vouch(None, base, listing)
    if not (isinstance(last, list) and len(last) == 4 and isinstance(last[0], str)):
        return UNVOUCHED
    key, rev, deleted, digest = last
    if not _revision(rev) or rev == 0 or not isinstance(deleted, bool):
        return UNVOUCHED
    if not (isinstance(digest, str) and len(digest) <= 64):
        return UNVOUCHED
    try:
        raw_key = binascii.a2b_base64(key, strict_mode=True)
    except (binascii.Error, ValueError):
        return UNVOUCHED
    if not 0 < len(raw_key) <= 256:
        return UNVOUCHED
    return Vouch(Witness(raw_key, rev, deleted, digest), base, listing)


def _listing(value: object) -> Listing | bool | None:
    """The listing a progress record names (None: none), or False if it is malformed."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and _revision(value[0])):
        return False
    revision = value[0]
    assert isinstance(revision, int)
    if revision == 0:
        return False
    rows = value[1]
    if not isinstance(rows, list) or len(rows) > len(RESOURCE_BY_NAME):
        return False
    tally: dict[str, tuple[int, int]] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)):
            return False
        if row[0] not in RESOURCE_BY_NAME:
            return False
        name, count, top = row
        if not (_revision(count) and _revision(top)) or name in tally:
            return False
        # keys listed have a newest write at or below the listing; none have none
        if top > revision or (count == 0) != (top == 0):
            return False
        tally[name] = (count, top)
    return Listing(revision, tally)


def unrecorded(fences: Mapping[str, FenceRecord], vouched: int) -> str | None:
    """Why the fences go past *vouched*, the revision a progress record vouches for, or
    None. A batch that landed after the last record (its term ended without one: killed,
    or cut off from the target) is a position in a history nothing read back vouches for:
    the source may have lost it since, and a resume would skip what replaced it."""
    ahead = max((f.pos[0] for f in fences.values()), default=0)
    if ahead > vouched:
        return f"fences at revision {ahead}, past the {vouched} its last record vouches for"
    return None


def progress_writes(raw: bytes | None, gen: int) -> list[tuple[bytes, int]]:
    """The source writes (key, revision) a progress record of generation *gen* says its
    watcher saw, or none when it says nothing that can be believed: a record of another
    generation may come from a source etcd replaced since (a resync opened this one)."""
    if raw is None or len(raw) > 4096:
        return []
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(record, dict) or record.get("gen") != gen:
        return []
    seen = record.get("seen")
    if not isinstance(seen, list):
        return []
    out = []
    for item in seen[:8]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return []
        key, mod = item
        if not isinstance(mod, int) or isinstance(mod, bool) or not 0 < mod < 1 << 63:
            return []
        try:
            raw_key = binascii.a2b_base64(key, strict_mode=True)
        except (binascii.Error, ValueError):
            return []
        if not 0 < len(raw_key) <= 256:
            return []
        out.append((raw_key, mod))
    return out


def new_generation(records: TargetRecords, current: int, now_ms: int) -> int:
    """The next generation: above every one the target or this watcher has seen, and never
    below the clock in milliseconds, which survives a target that forgot its records (batches
    of the forgotten generation may still be in flight) and a restarted watcher."""
    seen = [records.gen.gen if records.gen else 0, current]
    seen += [f.gen for f in records.fences.values()]
    return max([g + 1 for g in seen] + [now_ms])


# -- start ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFacts:
    """What the watcher knows of its source and its settings when it plans a target."""

    shards: list[str]
    shard_count: int
    identities: str
    source_cluster_id: int  # the source etcd's cluster ID
    source_rev: int  # the source's revision when the term began


@dataclass(frozen=True)
class Resume:
    """Carry on from the fences: each shard's chain continues after its fence, and events
    at or below `skip` are already covered (by the fence, or by the progress record)."""

    chain: dict[str, Position]
    skip: dict[str, Position]
    through: int  # the revision the progress record vouched for

    @property
    def watch_from(self) -> int:
        """The revision the watch must start from so that nothing after `skip` is missed."""
        return min(p[0] + 1 if p[1] == END else p[0] for p in self.skip.values())


@dataclass(frozen=True)
class Resync:
    cause: Cause
    detail: str = ""


def plan_start(records: TargetRecords, facts: SourceFacts) -> Resume | Resync:
    """Whether a new term may resume from the target's fences, or must list and diff."""
    old = records.gen
    if records.corrupt:
        return Resync(Cause.CORRUPT_RECORD, records.corrupt)
    if old is None:
        return Resync(Cause.NO_GENERATION)
    if records.draining_rev:
        # the drain took the cluster config at least, which no resume would write again
        return Resync(Cause.DRAINING, "a drain of this source had begun")
    if (old.shards, old.identities) != (facts.shard_count, facts.identities):
        return Resync(Cause.SETTINGS_CHANGED)
    if old.source_cluster_id != facts.source_cluster_id:
        return Resync(Cause.SOURCE_REPLACED, "the source etcd is another cluster")
    fences = records.fences
    if set(fences) != set(facts.shards) or any(
        f.gen != old.gen or not f.done for f in fences.values()
    ):
        return Resync(Cause.FENCES_INCOMPLETE)
    if max(f.pos[0] for f in fences.values()) > facts.source_rev:
        return Resync(Cause.FENCES_AHEAD)
    through = progress_rev(records.progress, old.gen, facts.source_rev)
    return Resume(
        chain={s: fences[s].pos for s in facts.shards},
        skip={s: max(fences[s].pos, (through, END)) for s in facts.shards},
        through=through,
    )


# -- the fence poll ---------------------------------------------------------------------------


@dataclass
class PairState:
    """What the watcher keeps of one target between polls (besides its publishing)."""

    gen: int
    chain: dict[str, Position]  # the position of the last batch published, per shard
    canaried: set[str] = field(default_factory=set)
    fence_pos: dict[str, Position] = field(default_factory=dict)
    behind_since: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Assessment:
    resync: Resync | None = None
    request: tuple[int, str] | None = None  # (mod revision to delete, honoured/stale/ignored)
    stalled: list[str] = field(default_factory=list)  # shards stalled past stall_timeout
    canaries: list[str] = field(default_factory=list)  # resources now complete
    fences: dict[str, FenceRecord] = field(default_factory=dict)


def complete(
    records: TargetRecords, pair: PairState, hold: frozenset[str] = frozenset()
) -> list[str]:
    """Resources whose canary is owed: every shard of theirs done in this generation, the
    canary not written yet, and not held (waiting for its source canary)."""
    out = []
    for res in RESOURCES:
        if res.canary is None or res.name in pair.canaried or res.name in hold:
            continue
        shards = [s for s in pair.chain if shard_resource(s) == res.name]
        if all(
            (f := records.fences.get(s)) is not None and f.gen == pair.gen and f.done
            for s in shards
        ):
            out.append(res.name)
    return out


def assess(
    records: TargetRecords,
    pair: PairState,
    now: float,
    stall_timeout: float,
    hold: frozenset[str] = frozenset(),
) -> Assessment:
    """One fence poll of a target. Updates pair.fence_pos and pair.behind_since (the only
    state it keeps) and says what is owed. Stalled shards are only candidates: the watcher
    resyncs for them only while its queue is empty (a long backlog is not a loss)."""
    if records.gen is None and not records.corrupt:
        return Assessment(Resync(Cause.TARGET_WIPED, "the target lost its kvmesh records"))
    if records.corrupt:
        return Assessment(Resync(Cause.CORRUPT_RECORD, records.corrupt))
    assert records.gen is not None
    if records.gen.gen != pair.gen:
        return Assessment(
            Resync(
                Cause.GENERATION_MOVED, f"generation moved to {records.gen.gen} under {pair.gen}"
            )
        )
    if records.draining_rev:
        # a watcher still running a config without this source began its drain (the
        # cluster config is gone already): a new generation ends it, and its resync puts
        # back what the drain took (drain.py leaves a source it finds watched alone after)
        return Assessment(
            Resync(Cause.DRAINING, "a watcher whose config lacks this source began draining it")
        )
    request = None
    if records.request is not None:
        asked = records.request.gen
        if asked == pair.gen:
            return Assessment(
                Resync(Cause.REQUESTED, "requested by a worker"),
                request=(records.request.mod_revision, "honoured"),
            )
        # below: made for a generation a resync already replaced; otherwise unreadable, or
        # for a generation nobody opened: not from a worker of ours
        outcome = "stale" if asked is not None and asked < pair.gen else "ignored"
        request = (records.request.mod_revision, outcome)
    stalled = []
    for shard, published in pair.chain.items():
        f = records.fences.get(shard)
        pos = f.pos if f is not None and f.gen == pair.gen else (0, 0)
        moved = pos != pair.fence_pos.get(shard)
        pair.fence_pos[shard] = pos
        if pos >= published:
            pair.behind_since.pop(shard, None)
            continue
        if moved or shard not in pair.behind_since:
            pair.behind_since[shard] = now
        elif now - pair.behind_since[shard] > stall_timeout:
            stalled.append(shard)
    canaries = complete(records, pair, hold)
    return Assessment(
        request=request, stalled=stalled, canaries=canaries, fences=dict(records.fences)
    )


def applied_through(
    delivered: int,
    pending: list[Position | None],
    fences: Mapping[str, FenceRecord],
    pair: PairState,
    snapshot_rev: int,
) -> int:
    """The highest revision R such that every synced source event up to R has landed in
    the target (0 while a snapshot is still landing); it is also a safe resume point.
    *delivered* is what every watch has delivered; *pending* the earliest positions still
    buffered or owed to this target."""
    through = delivered
    for p in pending:
        if p is not None:
            through = min(through, p[0] - 1)
    for shard, published in pair.chain.items():
        f = fences.get(shard)
        if f is None or f.gen != pair.gen or not f.done:
            return 0
        if f.pos < published:
            # everything of this shard before the fence landed; what follows may not have
            through = min(through, f.pos[0] - 1)
    return max(through, snapshot_rev)
