"""The source feed: one etcd watch per synced resource of a source, handed to the watcher as
typed items through a bounded inbox.

Each watch runs on a thread of its own. Its responses carry the feed's epoch, so responses
of a replaced stream are dropped; the inbox is bounded, so a watcher that falls behind slows
the watch threads down (and etcd's stream with them) instead of growing without limit. The
feed keeps what was delivered per resource, notices silent streams, reconnects a broken
one where it left off, and tells the watcher when the source lost the history it watched
(compacted, or an etcd restored or wiped), which only a resync of every target repairs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pipeline.clients.etcd import EtcdClient, Event, Stream, events_bytes
from pipeline.protocol.errors import (
    CompactedError,
    PermissionDeniedError,
    RefusedError,
    RetryableError,
    WatchDeniedError,
    show_key,
)
from pipeline.protocol.layout import RESOURCE_BY_NAME, RESOURCES, Resource
from pipeline.source.planner import Cause, Listing, Witness, value_digest

log = logging.getLogger("kvmesh.feed")

INBOX = 256  # watch responses waiting for the watcher, at most
# ... and the bytes of their events (as events_bytes counts them), at most: a response larger
# than that waits until the inbox is empty, and then goes in alone. The watch hands over
# parts of about WATCH_CHUNK_BYTES, so this holds several.
INBOX_BYTES = 16 << 20
RETRY_UNREACHABLE = 1.0  # seconds between looks at a source found unreachable
# A watch refused for lack of permission twice in a row (the second time with a fresh
# token) waits before its next try: 1 s, doubling up to a minute, until it delivers again.
RETRY_DENIED = 1.0
RETRY_DENIED_MAX = 60.0


def widening(base: float, n: int) -> float:
    """The wait before the next try after *n* refusals in a row beyond the first that
    waits: *base* doubled n times, RETRY_DENIED_MAX at most."""
    return min(base * float(2 ** min(n, 16)), RETRY_DENIED_MAX)


@dataclass(frozen=True)
class Delivered:
    """A watch response: events (possibly none: a progress notification saying everything
    up to header_rev was delivered)."""

    resource: Resource
    events: list[Event]
    header_rev: int
    size: int = 0  # of the events in memory (events_bytes), counted against INBOX_BYTES
    # when the watch delivered it: Unix ms (carried in the batches for the lag histogram)
    # and the monotonic clock (how long it waited for the watcher, kvstore_events_queue)
    received_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    received: float = field(default_factory=time.monotonic)
    # the stream that delivered it: what a stream replaced meanwhile still delivers is
    # dropped (its replacement delivers it again, from where the feed left off)
    stream: Stream | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Lost:
    """The source no longer holds the history the feed watched."""

    cause: Cause
    detail: str


FeedItem = Delivered | Lost


@dataclass(frozen=True)
class _Broken:
    resource: str
    error: BaseException
    stream: Stream | None


class SourceFeed:
    def __init__(
        self,
        etcd: EtcdClient,
        source: str,
        identities: str,
        watch_timeout: float,
        on_failure: Callable[[], None],
        inbox: int = INBOX,
        clock: Callable[[], float] = time.monotonic,
        retry_unreachable: float = RETRY_UNREACHABLE,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        self.etcd = etcd
        self.source = source
        self.identities = identities
        self.watch_timeout = watch_timeout
        self.on_failure = on_failure  # counts a failed source call or stream
        self.inbox: queue.Queue[tuple[int, Delivered | _Broken | None]] = queue.Queue(inbox)
        # the bytes of the responses in the inbox (Delivered.size), the room a watch thread
        # waits for, and the threads waiting for it, in the order they came
        self.inbox_bytes = inbox_bytes
        self.queued = 0
        self._room = threading.Condition()
        self._line: collections.deque[object] = collections.deque()
        # per resource, its responses in the inbox or waiting to go in: such a stream spoke,
        # however long the watcher takes to get to it (a replaced stream's count as its
        # resource's until the loop drops them)
        self.pending: collections.Counter[str] = collections.Counter()
        self.streams: dict[str, Stream] = {}
        self.clock = clock
        # when each stream was last heard from, as taken from the inbox: a watcher that is
        # merely behind (its inbox full) is not mistaken for a silent stream
        self.heard: dict[str, float] = {}
        self.epoch = 0
        self.delivered: dict[str, int] = {}  # per resource: every event up to here was seen
        # per resource, (revision, index) of the last event delivered of a revision that
        # was not delivered whole yet (see WATCH_SPLIT_PARTS): a stream that starts again
        # at that revision delivers its first events again
        self.partial: dict[str, tuple[int, int]] = {}
        # per resource whose stream was started again, the position up to which what it
        # delivers was delivered before (see _broken)
        self.replay: dict[str, tuple[int, int]] = {}
        self.last_event_rev = 0  # newest revision of any event of the watched prefixes
        self.config_rev = 0  # mod revision of the source's cluster config, as last seen
        # Writes the feed saw, to tell the same etcd from another one after a reconnect: per
        # resource, (key, revision) of the last put of its last response (or part) that had
        # one, else the newest write the last resync listed, or one a target's progress
        # record named and the term's start read back; and the cluster config as last
        # read. The same etcd holds each at its revision for ever (until compacted),
        # whatever happened to the key since.
        self.anchors: dict[str, tuple[bytes, int]] = {}
        # the newest write of each resource the last resync listed, for the next start()
        self.listed: dict[str, tuple[bytes, int]] = {}
        # the newest event taken since start() (or the one a resumed term read back): a
        # history lost from some revision on is lost up to the newest revision seen, so
        # this one read back as written vouches for every event taken
        self.newest: Witness | None = None
        self.started_at = 0  # the revision the watch began after (start())
        # what the last resync of this term listed: until the feed takes an event past it,
        # the source must still show it at its revision (listing_gone). Kept across start()
        self.listing: Listing | None = None
        # whether the history is read back once more when a stream of this start first
        # answers (_take): see start(); not before this time (time.monotonic) after a
        # look the source did not answer
        self.look_after_start = False
        self._look_not_before = 0.0
        # listing_gone's verdicts, for one pass of next() (or until forget_looks): the
        # streams that one restart of the source breaks come in one pass, and the read of a
        # resource's newest write makes etcd scan its range
        self._verdicts: dict[tuple[int, tuple[tuple[str, tuple[int, int]], ...]], str | None] = {}
        self.cluster_id = 0  # the source etcd's cluster ID when the feed started
        self.config_key = RESOURCE_BY_NAME["config"].source_prefix(source)
        # A broken stream of a source found unreachable waits for its next look on a timer
        # (_retry), outside the watcher's thread; the streams that break meanwhile wait for
        # the same look (until _unreachable_until) instead of each making its own. Real time
        # (time.monotonic), not self.clock: it paces calls to the source, like the timers.
        self.retry_unreachable = retry_unreachable
        self._unreachable_until = 0.0
        # per resource, its broken stream's item while it waits for its look, and the timer
        # that brings it back: a copy of it (check_silence finds a waiting stream silent) is
        # dropped, not retried twice
        self._waiting: dict[str, tuple[_Broken, threading.Timer]] = {}
        # per resource, how many times in a row its watch was refused for lack of
        # permission, with nothing delivered in between
        self.denied: dict[str, int] = {}
        self._timer = threading.Timer  # what _retry waits with (a test's never fires)
        self._refused_looks = 0  # looks in a row at the source that it refused

    # -- streams ----------------------------------------------------------------------------

    def start(self, start_rev: int) -> None:
        """Watch every resource from *start_rev* on, replacing any stream of before."""
        self.stop()
        epoch = self.epoch
        self.delivered = {r.name: start_rev - 1 for r in RESOURCES}
        self.partial = {}
        self.replay = {}
        # the cluster config as last read (the term's start, or the resync before) and what
        # that resync listed; the events from start_rev on add the others. Writes kept from
        # before must not vouch for this etcd: it may have been replaced since
        self.anchors = {"config": (self.config_key, self.config_rev)} if self.config_rev else {}
        self.remember(self.listed.values())
        self.listed = {}
        self.newest = None
        self.started_at = start_rev - 1
        # a new start (the source listed or resumed): a refusal first gets a new token
        # again, and a look at the source waits no longer than at first
        self.denied = {}
        self._refused_looks = 0
        self._unreachable_until = 0.0
        # What vouched for the history below start_rev was read back before the streams
        # began: a source that lost its history in between, and came back before they
        # did, breaks none of them. Once one answers (so it began after any such loss),
        # the history is read back once more; a loss after that breaks it.
        self.look_after_start = True
        self._look_not_before = 0.0
        for res in RESOURCES:
            self._start_stream(res, start_rev, epoch)

    def stop(self) -> None:
        """Stop every stream; whatever they still deliver is dropped."""
        self.epoch += 1
        for _, timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
        for stream in self.streams.values():
            stream.stop()
        self.streams = {}

    def wake(self) -> None:
        """Make a waiting next() return (the watcher is stopping)."""
        with contextlib.suppress(queue.Full):  # a full inbox wakes it anyway
            self.inbox.put_nowait((self.epoch, None))

    def _put(self, epoch: int, item: Delivered | _Broken) -> None:
        # blocks while the inbox is full, in responses or in bytes (backpressure on the
        # watch thread), but gives up once the stream was replaced: a replaced stream must
        # not hold its thread. Threads that wait for room in bytes go in the order they
        # came: a large part is not overtaken for ever by the small ones of other streams
        if not isinstance(item, Delivered):
            self._enqueue(epoch, item)
            return
        with self._room:
            self.pending[item.resource.name] += 1
            if item.size:
                me = object()
                self._line.append(me)
                try:
                    while self._line[0] is not me or (
                        self.queued and self.queued + item.size > self.inbox_bytes
                    ):
                        if epoch != self.epoch:
                            self.pending[item.resource.name] -= 1
                            return
                        self._room.wait(0.2)
                    self.queued += item.size
                finally:
                    self._line.remove(me)
                    self._room.notify_all()
        if not self._enqueue(epoch, item):
            self._taken(item)

    def _enqueue(self, epoch: int, item: Delivered | _Broken) -> bool:
        """Put *item* in the inbox, waiting while it is full; False if the stream was
        replaced meanwhile."""
        while epoch == self.epoch:
            try:
                self.inbox.put((epoch, item), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _taken(self, item: Delivered) -> None:
        """*item* left the inbox (or never went in): room for a waiting watch thread."""
        with self._room:
            self.queued -= item.size
            self.pending[item.resource.name] -= 1
            if item.size:
                self._room.notify_all()

    def _start_stream(self, res: Resource, start_rev: int, epoch: int) -> None:
        me: list[Stream] = []

        def on_events(events: list[Event], header_rev: int) -> None:
            part = Delivered(
                res, events, header_rev, events_bytes(events), stream=me[0] if me else None
            )
            self._put(epoch, part)

        def on_error(exc: BaseException) -> None:
            self._put(epoch, _Broken(res.name, exc, me[0] if me else None))

        stream = self.etcd.watch(
            res.source_prefix(self.source, self.identities),
            start_rev,
            on_events,
            on_error,
            exact=res.single_key,
        )
        me.append(stream)
        self.streams[res.name] = stream
        self.heard[res.name] = self.clock()

    # -- what the watcher takes -------------------------------------------------------------

    def next(self, timeout: float, limit: int, max_bytes: int | None = None) -> list[FeedItem]:
        """Wait up to *timeout* for something, then take what else is ready, up to *limit*
        items, and until their events pass *max_bytes* (the inbox's size by default).
        Broken streams are handled here: reconnected where they left off, or turned into a
        Lost item when the source lost its history."""
        max_bytes = self.inbox_bytes if max_bytes is None else max_bytes
        self.forget_looks()
        out: list[FeedItem] = []
        size = 0
        try:
            epoch, item = self.inbox.get(timeout=timeout)
            while True:
                if isinstance(item, Delivered):
                    self._taken(item)
                    size += item.size
                if epoch == self.epoch and item is not None:
                    taken = self._take(item)
                    if taken is not None:
                        out.append(taken)
                        if isinstance(taken, Lost):
                            return out
                if len(out) >= limit or size >= max_bytes:
                    return out
                epoch, item = self.inbox.get_nowait()
        except queue.Empty:
            return out

    def _take(self, item: Delivered | _Broken) -> FeedItem | None:
        if isinstance(item, _Broken):
            if item.stream is not None and self.streams.get(item.resource) is not item.stream:
                return None  # a stream already replaced
            return self._broken(item)
        name = item.resource.name
        if item.stream is not None and self.streams.get(name) is not item.stream:
            # a stream replaced at this epoch (found silent while a part was on its way,
            # say): its replacement starts where the feed left off
            return None
        self.heard[name] = self.clock()
        self.denied.pop(name, None)
        if self.look_after_start and time.monotonic() >= self._look_not_before:
            lost = self._look_again()
            if lost is not None:
                return lost
        cut = self.replay.get(name)
        if cut is not None and item.events:
            # a stream started again where its last one left off delivers what that one
            # delivered of the revision it starts at: not delivered twice
            if (item.events[0].revision, item.events[0].index) <= cut:
                item = replace(
                    item, events=[ev for ev in item.events if (ev.revision, ev.index) > cut]
                )
            if item.events:
                del self.replay[name]  # past it
        if item.events:
            last = item.events[-1]
            # a part that ends inside a revision says the one before as its header
            through = min(last.revision, item.header_rev)
            if through < last.revision:
                self.partial[name] = (last.revision, last.index)
            else:
                self.partial.pop(name, None)
            self.delivered[name] = max(self.delivered.get(name, 0), through)
            self.last_event_rev = max(self.last_event_rev, item.events[-1].revision)
            if item.resource.single_key:
                last = item.events[-1]
                self.config_rev = last.revision if last.value is not None else 0
            put = next((ev for ev in reversed(item.events) if ev.value is not None), None)
            if put is not None:
                self.anchors[name] = (put.key, put.revision)
            last = item.events[-1]
            if self.newest is None or last.revision >= self.newest.revision:
                digest = value_digest(last.value) if last.value is not None else ""
                self.newest = Witness(last.key, last.revision, last.value is None, digest)
        else:  # a progress notification: everything up to header_rev was delivered
            self.delivered[name] = max(self.delivered.get(name, 0), item.header_rev)
        return item

    def _broken(self, item: _Broken) -> Lost | None:
        exc = item.error
        if isinstance(exc, CompactedError):
            log.warning("%s: watch of %s compacted (%s)", self.source, item.resource, exc)
            return Lost(Cause.COMPACTED, str(exc))
        waiting = self._waiting.get(item.resource, (None, None))[0]
        if waiting is item:  # back from its wait: its next look
            del self._waiting[item.resource]
        elif waiting is not None:
            return None  # this stream already waits for its next look
        else:  # it just broke
            self.on_failure()
            if isinstance(exc, WatchDeniedError):
                refused = self.denied[item.resource] = self.denied.get(item.resource, 0) + 1
                if refused > 1:
                    # a fresh token did not help: the role may not read this range. Try
                    # again now and then (a grant may come), not in a loop of logins
                    delay = widening(RETRY_DENIED, refused - 2)
                    log.warning(
                        "%s: watch of %s refused %d times in a row: %s; next try in %.0fs",
                        self.source,
                        item.resource,
                        refused,
                        exc,
                        delay,
                    )
                    self._retry(item, delay)
                    return None
            log.warning("%s: watch of %s failed: %s; reconnecting", self.source, item.resource, exc)
        wait = self._unreachable_until - time.monotonic()
        if wait > 0:  # another stream just found the source down: this waits for that look
            self._retry(item, wait)
            return None
        try:
            replaced = self.replaced()
        except RetryableError as err:
            self.on_failure()
            # look again in a while, not in a spin, and without holding the watcher's loop
            # meanwhile: it still ticks, flushes what it has and stops when told to. (A
            # source that does not answer at all holds it for the look itself, up to the
            # etcd timeout, once per retry_unreachable at most.) A source that answers and
            # refuses the read user (its grant on its own cluster config gone, its login
            # refused) waits longer each time, as a refused watch does
            delay = self.retry_unreachable
            if isinstance(err, RefusedError):
                self._refused_looks += 1
                delay = widening(delay, self._refused_looks - 1)
                log.warning("%s: source refuses the read user: %s", self.source, err)
            else:
                log.warning("%s: source unreachable: %s", self.source, err)
            self._unreachable_until = time.monotonic() + delay
            self._retry(item, delay)
            return None
        self._refused_looks = 0
        if replaced:
            log.warning("%s: the source etcd lost its history (%s)", self.source, replaced)
            return Lost(Cause.SOURCE_REPLACED, replaced)
        old = self.streams.pop(item.resource, None)
        if old is not None:
            old.stop()
        # A fresh epoch for just this stream would drop the others' responses, so the
        # replacement keeps the epoch; the failed stream reports nothing more after its error.
        # It starts at the last revision delivered whole, not the one after: etcd says a
        # watch is compacted only if it starts below the compaction, and a compaction at
        # exactly the next revision would have taken its deletes (and, in a revision
        # delivered in part, changed what is left of it) without a word. What it delivers
        # again of that revision (and of the one delivered in part) is dropped (_take).
        # Not past base() either: the revisions delivered since held no event of this
        # resource, unless the source lost them and gave them to new writes.
        name = item.resource
        start = min(self.delivered[name], self.base())
        self.replay[name] = self.partial.get(name, (start, sys.maxsize))
        self._start_stream(RESOURCE_BY_NAME[name], max(1, start), self.epoch)
        return None

    def _look_again(self) -> Lost | None:
        """The history read back once the first stream of a start answered (see start()):
        Lost if the source etcd is not the one watched. A source that does not answer
        says nothing here: a loss breaks the streams, and their reconnection looks."""
        try:
            replaced = self.replaced()
        except RetryableError as exc:
            # again with a later response, a second from now at the soonest
            log.info("%s: cannot read the history back as the watch begins: %s", self.source, exc)
            self._look_not_before = time.monotonic() + 1.0
            return None
        self.look_after_start = False
        if replaced:
            log.warning("%s: the source etcd lost its history (%s)", self.source, replaced)
            return Lost(Cause.SOURCE_REPLACED, replaced)
        return None

    def _retry(self, item: _Broken, delay: float) -> None:
        """Put *item* back into the inbox after *delay* seconds, for its next look (unless
        the feed was restarted or stopped meanwhile: _put drops what an old epoch sends)."""

        def later() -> None:
            self._put(epoch, item)

        epoch = self.epoch
        timer = self._timer(delay, later)
        timer.daemon = True
        self._waiting[item.resource] = (item, timer)
        timer.start()

    def replaced(self) -> str | None:
        """Why the source etcd is not the one watched (restored or wiped), or None. An etcd
        started afresh with the same member names keeps its cluster ID, and its revision
        may pass the one watched within a second: in a mesh it is a target too, and the
        other clusters' watchers fill their caches in it at once, while its owner rebuilds
        it. So each write the feed keeps (`anchors`) is read at its revision as well: the
        same etcd still shows it there; another one has another key, or nothing, at that
        revision. A read the etcd compacted away proves nothing and is skipped."""
        rev, cluster_id = self.etcd.header()
        if cluster_id != self.cluster_id:
            return "another cluster ID"
        newest = [self.newest.revision] if self.newest is not None else []
        listing = self.open_listing()
        listed = [listing.revision] if listing is not None else []
        seen = max(
            [*self.delivered.values(), *(m for _, m in self.anchors.values()), *newest, *listed]
        )
        if rev < seen:
            return f"revision {rev} is below {seen}, already seen"
        gone = self.unseen(self.anchors.values())
        if gone is None and self.newest is not None:
            # the newest event, a delete maybe (the writes kept are puts, older perhaps).
            # Compacted away or unreadable, it proves nothing: the streams start again at
            # its revision (base()), where etcd says so in turn
            with contextlib.suppress(CompactedError, PermissionDeniedError):
                gone = self.witness_gone(self.newest)
        if gone is None and listing is not None:
            gone = self.listing_gone(listing)
        return gone

    def open_listing(self) -> Listing | None:
        """The last listing, unless an event taken past it vouches for it (the newest,
        read back as taken)."""
        listing, newest = self.listing, self.newest
        if listing is not None and newest is not None and newest.revision >= listing.revision:
            return None
        return listing

    def forget_looks(self) -> None:
        """Ask the source again at the next listing_gone (see _verdicts)."""
        if self._verdicts:  # next() calls this at every pass of the watcher's loop
            self._verdicts = {}

    def adopt_listing(self, listing: Listing, newest: dict[str, tuple[bytes, int]]) -> None:
        """What a resync listed: *listing*, checked until an event past it (listing_gone),
        and each resource's newest write listed (*newest*), kept for the read-backs in
        place of an older one (a resync during a term lists past the events taken), so
        that the write the listing's newest revision names is read back as written."""
        self.listing = listing
        self.listed = newest
        for name, (key, mod) in newest.items():
            kept = self.anchors.get(name)
            if kept is None or kept[1] < mod:
                self.anchors[name] = (key, mod)

    def listing_gone(self, listing: Listing) -> str | None:
        """Why the source etcd does not show, at *listing*'s revision, what that listing
        read (another number of keys in a resource's range, or another newest write: the
        write itself is among the anchors, read back by replaced()), or None. Per
        resource, a count and a read of its newest write, which makes etcd scan the range
        at that revision (40-90 ms for 50,000 identities here, benchmarks/
        listing_check_cost.py); the verdict holds for a pass of next(). A revision
        compacted away, or a range the role may not read, proves nothing and is skipped."""
        key = (listing.revision, tuple(sorted(listing.tally.items())))
        if key not in self._verdicts:
            self._verdicts[key] = self._listing_gone(*key)
        return self._verdicts[key]

    def _listing_gone(self, at: int, tally: tuple[tuple[str, tuple[int, int]], ...]) -> str | None:
        for name, (count, top) in tally:
            res = RESOURCE_BY_NAME[name]
            prefix = res.source_prefix(self.source, self.identities)
            try:
                now = self.etcd.count(prefix, at, exact=res.single_key)
                newest = self.etcd.latest_change(prefix, 0, res.single_key, at) if now else 0
            except (CompactedError, PermissionDeniedError):
                continue
            if now != count:
                return f"{name} held {now} keys at revision {at}, where {count} were listed"
            if newest != top:
                return f"the newest write of {name} at revision {at} is at {newest}, not {top}"
        return None

    def compacted_past(self, revision: int) -> bool:
        """Whether the source compacted its history past *revision*: a watch from the one
        after would be refused. A read the role may not make says nothing (False)."""
        if revision <= 0:
            return False
        try:
            self.etcd.scan(self.config_key, revision, exact=True)
        except CompactedError:
            return True
        except PermissionDeniedError:
            return False
        return False

    def base(self) -> int:
        """The revision up to which this feed's history is vouched for: the newest event it
        took (read back as taken after a reconnect), or where its watch began. Revisions
        past it that were delivered held no event: a reconnected stream delivers them
        again, for a source that lost them may have given them to new writes."""
        newest = self.newest.revision if self.newest is not None else 0
        return max(newest, self.started_at)

    def witness_gone(self, w: Witness) -> str | None:
        """Why the source etcd does not show *w* as taken (its key written, or deleted, at
        its revision), or None if it does. Raises CompactedError or PermissionDeniedError
        when that cannot be read."""
        _, kvs = self.etcd.scan(w.key, w.revision, exact=True)
        kv = next(kvs, None)
        if not w.deleted:
            if (
                kv is not None
                and kv.mod_revision == w.revision
                and (not w.digest or value_digest(kv.value) == w.digest)
            ):
                return None
            return f"{show_key(w.key)} is not as written at revision {w.revision}"
        before = None
        if kv is None and w.revision > 1:
            _, kvs = self.etcd.scan(w.key, w.revision - 1, exact=True)
            before = next(kvs, None)
        if before is not None:
            return None
        return f"{show_key(w.key)} was not deleted at revision {w.revision}"

    def unseen(
        self, writes: Iterable[tuple[bytes, int]], verified: list[int] | None = None
    ) -> str | None:
        """Why the source etcd does not hold one of *writes* (key, revision) at its revision,
        or None: each is read there. A read compacted away proves nothing and is skipped;
        so is one the role may no longer make (a grant revoked on that range, whose watch
        is refused too and waits), as long as another write than the cluster config (which
        a rebuilt etcd often writes at the same early revision) was read as written. With
        none, nothing vouches for the etcd: PermissionDeniedError, and the caller looks
        again later. The revisions of those read back as written go to *verified*."""
        refused: list[PermissionDeniedError] = []
        vouched = False
        for key, mod in writes:
            try:
                _, kvs = self.etcd.scan(key, mod, exact=True)
                kv = next(kvs, None)
            except CompactedError:
                continue
            except PermissionDeniedError as exc:
                refused.append(exc)
                continue
            if kv is None or kv.mod_revision != mod:
                return f"{show_key(key)} is not as written at revision {mod}"
            vouched = vouched or key != self.config_key
            if verified is not None:
                verified.append(mod)
        if refused and not vouched:
            raise PermissionDeniedError(
                f"{len(refused)} writes that would vouch for the source's history are in "
                f"ranges the read user may not read: {refused[0]}",
                refused[0].cluster,
            )
        return None

    def resource_of(self, key: bytes) -> str | None:
        """The watched resource *key* belongs to, or None (a key the feed does not read)."""
        for res in RESOURCES:
            prefix = res.source_prefix(self.source, self.identities)
            if (key == prefix) if res.single_key else (key.startswith(prefix) and key != prefix):
                return res.name
        return None

    def remember(self, writes: Iterable[tuple[bytes, int]]) -> None:
        """Keep *writes* (read back in this etcd) for resources that have none yet."""
        for key, mod in writes:
            name = self.resource_of(key)
            if name is not None and name not in self.anchors:
                self.anchors[name] = (key, mod)

    def kept_writes(self) -> list[tuple[bytes, int]]:
        """The writes the feed keeps (one per resource), for a progress record: a new term
        reads them back before it resumes (planner.encode_progress keeps what fits)."""
        return list(self.anchors.values())

    def check_silence(self) -> list[Lost]:
        """Ask every stream how far it delivered; replace one that answered nothing for
        watch_timeout (a live etcd always answers: this one is cut off). A stream whose
        responses wait for the watcher (the loop takes a few megabytes a pass) answered."""
        out: list[Lost] = []
        for name, stream in list(self.streams.items()):
            if name in self._waiting:
                continue  # broken already, and waiting for its next look at the source
            silent = self.clock() - self.heard.get(name, 0.0)
            if silent <= self.watch_timeout or self.pending[name]:
                stream.request_progress()
                continue
            stream.stop()
            error = RetryableError(f"watch of {name} silent for {silent:.0f}s")
            lost = self._broken(_Broken(name, error, stream))
            if lost is not None:
                out.append(lost)
                break
        return out

    def delivered_through(self) -> int:
        """Every event of every watched resource up to here was delivered."""
        return min(self.delivered.values()) if self.delivered else 0
