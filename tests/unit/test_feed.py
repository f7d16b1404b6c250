"""The source feed's history check (SourceFeed.replaced) on an in-memory etcd: the same etcd
is never taken for another, whatever the order in which its streams deliver, break and
resume; an etcd back empty is, even once its revision passed the one watched."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clients.etcd import Event, Put
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.layout import RESOURCE_BY_NAME, RESOURCES
from pipeline.source.feed import Delivered, Lost, SourceFeed, _Broken
from pipeline.source.planner import (
    UNKNOWN,
    UNVOUCHED,
    Cause,
    Listing,
    Vouch,
    Witness,
    encode_progress,
    progress_rev,
    progress_vouch,
    progress_writes,
)
from tests.harness import check_reads_at_a_past_revision, eventually
from tests.memory_etcd import MemoryEtcd

SOURCE = "a"
CONFIG = RESOURCE_BY_NAME["config"].source_prefix(SOURCE)
KEYS = [
    CONFIG,
    *(RESOURCE_BY_NAME["nodes"].source_prefix(SOURCE) + b"node-%d" % i for i in range(3)),
    *(RESOURCE_BY_NAME["identities"].source_prefix(SOURCE) + b"%d" % (65536 + i) for i in range(3)),
]
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "pump", "take", "restart", "compact"]),
        st.sampled_from(KEYS),
    ),
    max_size=80,
)


def started_feed(etcd: MemoryEtcd) -> SourceFeed:
    """A feed started as the watcher starts it after a resync: from the revision after the
    listing, knowing the cluster config the resync read."""
    etcd.put(CONFIG, b'{"id":1}')
    etcd.put(KEYS[1], b"{}")
    feed = SourceFeed(etcd, SOURCE, "id", watch_timeout=60, on_failure=lambda: None)
    rev, feed.cluster_id = etcd.header()
    config = etcd.get(CONFIG)
    assert config is not None
    feed.config_rev = config.mod_revision
    feed.start(rev + 1)
    return feed


def play(etcd: MemoryEtcd, feed: SourceFeed, steps: list[tuple[str, bytes]]) -> None:
    """Each step on the source etcd (a write, a response delivered, a restart with the data
    kept, a compaction) or the feed taking what came, which never says the etcd was
    replaced."""
    for n, (op, key) in enumerate(steps):
        if op == "put":
            etcd.put(key, b'{"v":%d}' % n)
        elif op == "delete":
            etcd.delete(key)
        elif op == "pump":
            etcd.pump()
        elif op == "take":
            assert replaced(feed.next(0, 100)) == []
        elif op == "restart":
            etcd.restart()
        else:
            etcd.compact()


def replaced(items: list[object]) -> list[Lost]:
    return [i for i in items if isinstance(i, Lost) and i.cause is Cause.SOURCE_REPLACED]


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_the_same_etcd_is_never_taken_for_another(steps: list[tuple[str, bytes]]) -> None:
    """Puts and deletes of the keys whose writes the feed keeps, responses delivered in any
    order across the streams, restarts with the data kept (every stream breaks) and
    compactions (a resumed watch may then report one, never a replaced etcd)."""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    play(etcd, feed, steps)
    for _ in range(len(steps) + 2):  # everything delivered, broken streams resumed
        etcd.pump()
        assert replaced(feed.next(0, 1000)) == []


@settings(max_examples=100, deadline=None)
@given(STEPS, st.integers(min_value=0, max_value=20))
def test_an_etcd_back_empty_is_noticed_past_the_revision_watched(
    steps: list[tuple[str, bytes]], beyond: int
) -> None:
    """Whatever the feed saw before, an etcd back empty (same cluster ID) whose revision is
    already past every revision the feed saw when the feed looks, refilled with other keys
    before its cluster config, is another one. (An owner that writes the config first gives
    it the revision it had before: the config alone does not tell then, see
    docs/architecture.md.)"""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    play(etcd, feed, [(op, key) for op, key in steps if op not in ("restart", "compact")])
    etcd.pump()
    assert replaced(feed.next(0, 100)) == []
    seen = etcd.revision()
    etcd.wipe()
    for i in range(seen + beyond):  # other watchers' caches, then the owner's rebuild
        etcd.put(b"cilium/cache/nodes/v1/c/node-%d" % i, b"{}")
    etcd.put(CONFIG, b'{"id":1}')
    assert len(replaced(feed.next(0, 1000))) == 1


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"not json",
        b"[]",
        b'{"gen": 8, "rev": 5, "seen": [["a2V5", 3]]}',  # another generation
        b'{"gen": 7, "rev": 5}',  # a watcher of before 2026-11-29
        b'{"gen": 7, "rev": 5, "seen": "a2V5"}',
        b'{"gen": 7, "rev": 5, "seen": [["a2V5"]]}',
        b'{"gen": 7, "rev": 5, "seen": [["a2V5", 0]]}',
        b'{"gen": 7, "rev": 5, "seen": [["a2V5", true]]}',
        b'{"gen": 7, "rev": 5, "seen": [["a2V5", 3], ["not base64!", 4]]}',
        b'{"gen": 7, "rev": 5, "seen": [["a2V5", 3], ["a2V5\\n", 4]]}',  # only strict base64
        b'{"gen": 7, "rev": 5, "seen": [[7, 4]]}',
        b'{"gen": 7, "rev": 5, "seen": [["", 3]]}',  # an empty key
        b'{"gen": 7, "rev": 5, "seen": [["' + b"QUFB" * 86 + b'", 3]]}',  # 258 bytes
        b'{"gen": 7, "seen": [["a2V5", 3]], "pad": "' + b"x" * 4096 + b'"}',
    ],
)
def test_a_progress_record_vouches_for_writes_only_when_it_can_be_believed(
    raw: bytes | None,
) -> None:
    """A target's records are input: a record of another generation, of an older watcher,
    or malformed in any way vouches for nothing (and raises nothing)."""
    assert progress_writes(raw, 7) == []


def test_a_progress_record_carries_the_writes_it_was_given() -> None:
    raw = b'{"gen": 7, "rev": 5, "seen": [["a2V5", 3], ["/w==", 4]]}'
    assert progress_writes(raw, 7) == [(b"key", 3), (b"\xff", 4)]


def test_a_progress_record_keeps_what_fits_and_stays_believed() -> None:
    """The largest record (8 writes of 256-byte keys at the largest revisions) stays under
    the 4 KiB that progress_rev believes; longer keys and a ninth write are left out, not
    written to make the record unbelievable."""
    top = (1 << 63) - 1
    seen = [(bytes([i]) * 256, top - i) for i in range(9)] + [(b"k" * 257, 5)]
    last = Witness(b"\xfe" * 256, top, True, "f" * 16)
    listing = Listing(top, {name: (top, top - 1) for name in RESOURCE_BY_NAME})
    raw = encode_progress(7, 1 << 62, seen, 1.8e9, last, top, listing)
    assert len(raw) < 4096
    assert progress_rev(raw, 7, 1 << 62) == 1 << 62
    assert progress_writes(raw, 7) == seen[:8]
    assert progress_vouch(raw, 7) == Vouch(last, top, listing)
    assert progress_writes(encode_progress(7, 5, [(b"", 3)], 0.0), 7) == []


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"not json",
        b'{"gen": 8, "rev": 5, "seen": [], "last": null, "base": 3}',  # another generation
        b'{"gen": 7, "rev": 5, "seen": [], "last": null}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": null, "base": -1}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": null, "base": true}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": false, "base": 3}',  # a key too long
        b'{"gen": 7, "rev": 5, "seen": [], "last": "a2V5", "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["a2V5", 3], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["a2V5", 0, false], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["a2V5", true, false], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["a2V5", 3, 0], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["not base64!", 3, false], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": ["", 3, false], "base": 3}',
        b'{"gen": 7, "rev": 5, "seen": [], "last": [7, 3, false], "base": 3}',
        b'{"gen": 7, "last": null, "base": 3, "pad": "' + b"x" * 4096 + b'"}',
        b'{"gen": 7, "last": null, "base": 3, "listing": 3}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [-1, []]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, {"nodes": [1, 2]}]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 1]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodez", 1, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [[["nodes"], 1, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", -1, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 1, 2.5]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 1, 2], ["nodes", 1, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [0, [["nodes", 1, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 1, 4]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 0, 2]]]}',
        b'{"gen": 7, "last": null, "base": 3, "listing": [3, [["nodes", 1, 0]]]}',
    ],
)
def test_a_progress_record_vouches_past_its_writes_only_when_it_can_be_believed(
    raw: bytes | None,
) -> None:
    """What a record vouches for past its writes is input too: no record, one of another
    generation, or anything malformed vouches for nothing (UNVOUCHED), and raises nothing."""
    assert progress_vouch(raw, 7) is UNVOUCHED


def test_a_progress_record_vouches_for_the_newest_event_it_was_given() -> None:
    # a record of this generation by a watcher that did not name the newest event
    assert progress_vouch(b'{"gen": 7, "rev": 5, "seen": []}', 7) is UNKNOWN
    assert progress_vouch(encode_progress(7, 5, [], 0.0, None, 4), 7) == Vouch(None, 4)
    raw = encode_progress(7, 5, [], 0.0, Witness(b"\xffkey", 9, True), 9)
    assert progress_vouch(raw, 7) == Vouch(Witness(b"\xffkey", 9, True), 9)
    # and the listing its term began with (a record of before names none)
    listing = Listing(4, {"nodes": (10, 3), "services": (0, 0)})
    raw = encode_progress(7, 5, [], 0.0, None, 4, listing)
    assert progress_vouch(raw, 7) == Vouch(None, 4, listing)
    assert progress_vouch(b'{"gen": 7, "last": null, "base": 4}', 7) == Vouch(None, 4)
    # a key too long to keep is not kept: the record then vouches for no more than the
    # writes it names
    too_long = encode_progress(7, 5, [], 0.0, Witness(b"k" * 257, 9, False), 9)
    assert progress_vouch(too_long, 7) is UNVOUCHED


def down_feed(failures: list[None], **kwargs: Any) -> tuple[MemoryEtcd, SourceFeed]:
    """A started feed whose source is down: every stream broke, nothing answers."""
    etcd = MemoryEtcd(SOURCE)
    feed = SourceFeed(
        etcd, SOURCE, "id", watch_timeout=15, on_failure=lambda: failures.append(None), **kwargs
    )
    etcd.put(CONFIG, b'{"id":1}')
    rev, feed.cluster_id = etcd.header()
    feed.config_rev = rev
    feed.start(rev + 1)
    etcd.set_down(True)
    etcd.restart()
    return etcd, feed


def test_streams_that_break_while_the_source_is_down_share_one_look() -> None:
    """Each stream that breaks is counted once, and they wait together for one look at the
    source, however long they stay silent meanwhile."""
    failures: list[None] = []
    clock = [0.0]
    _, feed = down_feed(failures, clock=lambda: clock[0], retry_unreachable=3600)
    assert feed.next(0, 1000) == []
    assert len(failures) == len(RESOURCES) + 1  # the breaks, and the one look that failed
    clock[0] += 60  # every stream silent for longer than watch_timeout
    assert feed.check_silence() == []
    assert feed.next(0, 1000) == []
    assert feed.inbox.empty()
    assert len(failures) == len(RESOURCES) + 1  # the waiting streams were not filed again
    # a copy of a waiting stream's item (however it came) is dropped, not looked at
    waiting, _ = feed._waiting["nodes"]
    copy = _Broken(waiting.resource, waiting.error, waiting.stream)
    assert feed._broken(copy) is None
    assert len(failures) == len(RESOURCES) + 1
    timers = [t for _, t in feed._waiting.values()]
    assert len(timers) == len(RESOURCES) and all(t.is_alive() for t in timers)
    feed.stop()
    eventually(
        lambda: not any(t.is_alive() for t in timers), timeout=10, what="the timers cancelled"
    )


def test_a_feed_whose_source_is_down_does_not_hold_the_watcher() -> None:
    """With the source down, every broken stream waits for its next look at the source
    outside the watcher's thread: next() returns (the watcher ticks, flushes and can stop),
    and once the source is back the streams resume where they left off."""
    failures: list[None] = []
    etcd, feed = down_feed(failures, retry_unreachable=0.05)
    for _ in range(5):  # each pass takes the streams that came back meanwhile
        taker = threading.Thread(target=feed.next, args=(0.2, 1000), daemon=True)
        taker.start()
        taker.join(timeout=10)
        assert not taker.is_alive(), "next() did not return while the source was down"
    assert len(failures) > len(RESOURCES) + 1, "the streams did not look at the source again"

    etcd.set_down(False)
    etcd.put(KEYS[1], b'{"back":1}')

    def delivered() -> bool:
        etcd.pump()
        return any(
            isinstance(i, Delivered) and any(e.key == KEYS[1] for e in i.events)
            for i in feed.next(0.1, 1000)
        )

    eventually(delivered, timeout=30, what="the write made after the source came back")


class HeldTimer:
    """A timer that fires only when a test says so (SourceFeed._timer)."""

    made: ClassVar[list[HeldTimer]] = []

    def __init__(self, interval: float, fn: Any) -> None:
        self.interval, self.fn, self.daemon, self.cancelled = interval, fn, True, False
        HeldTimer.made.append(self)

    def start(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True

    def is_alive(self) -> bool:
        return not self.cancelled

    def fire(self) -> None:
        assert not self.cancelled
        self.cancelled = True
        self.fn()


def test_a_watch_refused_for_its_permission_waits_longer_each_time() -> None:
    """A watch etcd refuses for lack of permission (a grant revoked on a range the feed
    watched, whose writes it holds as anchors) gets one immediate try with a fresh token
    (an expired one is refused the same way); the anchor it can no longer read proves
    nothing and is skipped. Refused again with nothing delivered in between, it waits 1 s,
    2 s, 4 s... up to a minute between tries instead of looping through logins, and a
    response resets the count. A stream of another resource that breaks meanwhile is
    restarted at once: the refused range does not make the source look unreachable."""
    failures: list[None] = []
    etcd = MemoryEtcd(SOURCE)
    node = KEYS[1]
    nodes = RESOURCE_BY_NAME["nodes"].source_prefix(SOURCE)
    feed = started_feed(etcd)
    feed.on_failure = lambda: failures.append(None)
    HeldTimer.made = []
    feed._timer = HeldTimer
    etcd.put(node, b'{"v":1}')
    etcd.put(KEYS[4], b'{"v":1}')  # an identity: a write the role may still read back
    etcd.pump()
    assert [i for i in feed.next(0, 100) if isinstance(i, Delivered)]
    assert feed.anchors["nodes"][0] == node  # a write the feed will read back
    assert feed.anchors["identities"][0] == KEYS[4]

    etcd.unreadable = (nodes,)  # the grant revoked: etcd refuses the stream at its reconnect
    feed.streams["nodes"].refused = True

    def refused_again() -> float:
        """The nodes stream refused once more; how long it then waits for its next try."""
        etcd.pump()
        assert feed.next(0, 100) == []
        assert "nodes" in feed._waiting and feed._unreachable_until == 0
        return HeldTimer.made[-1].interval

    etcd.pump()
    assert feed.next(0, 100) == []
    assert "nodes" not in feed._waiting  # the first refusal: a new stream at once
    delays = [refused_again()]
    for _ in range(7):
        HeldTimer.made[-1].fire()  # its next try
        assert feed.next(0, 100) == []  # a new stream
        delays.append(refused_again())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert len(failures) == 9  # each refusal counted once

    # another resource's stream that breaks meanwhile is back at once
    services = feed.streams["services"]
    services.on_error(RetryableError("etcd a: connection reset", "a"))
    assert feed.next(0, 100) == []
    assert "services" not in feed._waiting and feed.streams["services"] is not services

    feed.denied["nodes"] = 10_000  # months of refusals: still a minute, not an overflow
    HeldTimer.made[-1].fire()
    assert feed.next(0, 100) == []
    assert refused_again() == 60

    # the grant is back: the next try's stream delivers, and that resets the count
    etcd.unreadable = ()
    HeldTimer.made[-1].fire()
    assert feed.next(0, 100) == []
    etcd.put(node, b'{"v":2}')
    etcd.pump()
    assert [i for i in feed.next(0, 100) if isinstance(i, Delivered)]
    assert "nodes" not in feed.denied
    feed.streams["nodes"].refused = True
    etcd.pump()
    assert feed.next(0, 100) == []
    assert "nodes" not in feed._waiting  # a first refusal again: tried at once
    feed.denied["nodes"] = 5
    feed.start(etcd.revision() + 1)  # a new start forgets the refusals
    assert feed.denied == {}
    feed.stop()


def test_a_refused_range_whose_writes_alone_vouch_for_the_source_holds_the_streams() -> None:
    """If the only writes the feed can read back to tell this etcd from a rebuilt one are
    in the range the role may no longer read, nothing vouches for the etcd: the broken
    streams wait, looked at less and less often, instead of watching what may be another
    etcd; once a write the role may read vouches for it again, they resume."""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    HeldTimer.made = []
    feed._timer = HeldTimer
    etcd.put(KEYS[1], b'{"v":1}')
    etcd.pump()
    assert [i for i in feed.next(0, 100) if isinstance(i, Delivered)]
    assert set(feed.anchors) == {"config", "nodes"}  # the config alone proves little

    etcd.unreadable = (RESOURCE_BY_NAME["nodes"].source_prefix(SOURCE),)
    feed.streams["nodes"].refused = True
    etcd.pump()
    assert feed.next(0, 100) == []
    assert "nodes" in feed._waiting and feed._unreachable_until > 0
    assert HeldTimer.made[-1].interval == 1
    services = feed.streams["services"]  # a stream that breaks meanwhile waits too
    services.on_error(RetryableError("etcd a: connection reset", "a"))
    assert feed.next(0, 100) == []
    assert "services" in feed._waiting

    etcd.unreadable = ()  # the grant is back: the node vouches again
    feed._unreachable_until = 0.0  # the wait is over (the held timers stand for it)
    for t in [t for t in HeldTimer.made if not t.cancelled]:
        t.fire()
    assert feed.next(0, 100) == []
    assert not feed._waiting and feed._refused_looks == 0
    feed.stop()


def test_a_source_that_refuses_the_read_user_is_looked_at_less_often() -> None:
    """A source whose read user may not even read its own cluster config (the look that
    tells a restarted etcd from another one) is looked at again after 1 s, then 2 s, 4 s...
    up to a minute, not every second for ever; a look that passes resets it."""
    failures: list[None] = []
    etcd, feed = down_feed(failures, retry_unreachable=1.0)
    HeldTimer.made = []
    feed._timer = HeldTimer
    etcd.set_down(False)
    etcd.unreadable = (b"cilium/cluster-config/",)
    assert feed.next(0, 1000) == []  # every stream broke; the first look is refused
    # one look for every stream: the others wait for what is left of its wait
    delays = [round(max(t.interval for t in HeldTimer.made))]
    for _ in range(7):
        waiting = [t for t in HeldTimer.made if not t.cancelled]
        feed._unreachable_until = 0.0  # the wait is over (the held timers stand for it)
        for t in waiting:
            t.fire()
        assert feed.next(0, 1000) == []
        delays.append(round(max(t.interval for t in HeldTimer.made[-len(waiting) :])))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert len(failures) == len(RESOURCES) + 8  # the breaks, and each refused look
    etcd.unreadable = ()
    feed._unreachable_until = 0.0
    for t in [t for t in HeldTimer.made if not t.cancelled]:
        t.fire()
    assert feed.next(0, 1000) == []
    assert feed._refused_looks == 0 and not feed._waiting  # every stream watches again
    # a new start forgets refused looks, and a wait that one left
    feed._refused_looks, feed._unreachable_until = 7, time.monotonic() + 60
    feed.start(etcd.revision() + 1)
    assert feed._refused_looks == 0 and feed._unreachable_until == 0
    feed.stop()


def test_a_stream_started_again_inside_a_revision_delivered_in_part_skips_what_came() -> None:
    """The first parts of a very large revision say the revision before as their header; a
    broken stream starts again at that revision before, and the feed drops what it delivers
    again."""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    nodes = RESOURCE_BY_NAME["nodes"]
    key = nodes.source_prefix(SOURCE) + b"n"
    etcd.txn([], [Put(key + b"%d" % i, b"{}") for i in range(3)])
    rev = etcd.revision()  # three events

    def part(*events: tuple[int, int], header: int) -> Delivered:
        return Delivered(nodes, [Event(r, i, key + b"%d" % i, b"{}") for r, i in events], header)

    first = feed._take(part((rev, 0), (rev, 1), header=rev - 1))
    assert isinstance(first, Delivered) and len(first.events) == 2
    assert feed.delivered["nodes"] == rev - 1  # not delivered whole yet
    old = feed.streams["nodes"]
    assert feed._take(_Broken("nodes", RetryableError("cut off", SOURCE), old)) is None
    assert feed.streams["nodes"] is not old
    assert feed.streams["nodes"].next_rev == rev - 1  # type: ignore[attr-defined]
    again = feed._take(part((rev - 1, 0), (rev, 0), (rev, 1), (rev, 2), header=rev))
    assert isinstance(again, Delivered)
    assert [(ev.revision, ev.index) for ev in again.events] == [(rev, 2)]
    assert feed.delivered["nodes"] == rev
    assert feed.partial == {} and feed.replay == {}
    feed.stop()


def test_a_broken_stream_finds_a_compaction_at_the_revision_after_its_last() -> None:
    """etcd says a watch is compacted only if it starts below the compaction; one at the
    revision right after the last delivered would have taken that revision's deletes. A
    broken stream starts again at the last revision it delivered, and so learns of it."""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    etcd.delete(KEYS[1])  # a node's delete, not delivered yet
    etcd.compact()
    old = feed.streams["nodes"]
    assert feed._take(_Broken("nodes", RetryableError("cut off", SOURCE), old)) is None
    etcd.pump()
    lost = [i for i in feed.next(0.1, 10) if isinstance(i, Lost)]
    assert [i.cause for i in lost] == [Cause.COMPACTED]
    feed.stop()


def test_what_a_replaced_stream_still_delivers_is_dropped() -> None:
    """A stream replaced at the same epoch (found silent, say) may still have a part on its
    way; its replacement delivers that again from where the feed left off, so the late part
    is dropped, not taken after what the replacement delivered."""
    etcd = MemoryEtcd(SOURCE)
    feed = started_feed(etcd)
    nodes = RESOURCE_BY_NAME["nodes"]
    rev = etcd.revision()
    old = feed.streams["nodes"]
    assert feed._take(_Broken("nodes", RetryableError("cut off", SOURCE), old)) is None
    late = Delivered(nodes, [Event(rev + 1, 0, KEYS[1], b"{}")], rev + 1, stream=old)
    assert feed._take(late) is None
    assert feed.delivered["nodes"] == rev
    current = Delivered(nodes, [Event(rev + 1, 0, KEYS[1], b"{}")], rev + 1)
    current = replace(current, stream=feed.streams["nodes"])
    assert feed._take(current) is not None
    assert feed.delivered["nodes"] == rev + 1
    feed.stop()


def test_reads_at_a_past_revision_as_a_real_etcd_answers_them() -> None:
    check_reads_at_a_past_revision(MemoryEtcd(SOURCE), b"cilium/state/services/v1/a/")
