"""A source etcd that comes back without the end of its history, under the same cluster ID:
a crash that lost writes not yet flushed (etcd before 3.5.5 applies, and shows watchers,
what a single member has not flushed yet), or a data dir restored from a copy. Before any
watcher looks again its revision passes the one watched (other clusters' watchers fill their
caches in it), so the lost revisions hold other writes. What landed of the lost writes must
not stay cached, whether the watcher watched through it or a new term starts; a term that
ends without recording what it took resyncs rather than resume on positions nothing vouches
for. The real watcher and applier on in-memory etcds (tests/rig.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.protocol.fence import FenceRecord
from pipeline.protocol.names import progress_key
from pipeline.source.planner import Cause
from tests.rig import Rig

NODE = b"cilium/state/nodes/v1/a/"
RESUMES = "kvmesh_watcher_resumes_total"


def synced() -> Rig:
    rig = Rig()
    for i in range(10):
        rig.source.put(NODE + b"node-%d" % i, b'{"name":"node-%d"}' % i)
    rig.start()
    rig.settle()
    return rig


def lose_the_end(rig: Rig, keep: int) -> None:
    """The source loses every revision after *keep*, then passes the revision it had: other
    clusters' caches are written in it (nothing the watcher reads)."""
    seen = rig.source.revision()
    rig.source.rewind(keep)
    while rig.source.revision() <= seen + 2:
        rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")


def change(rig: Rig, kind: str) -> bytes:
    """A change of the source that the history will lose: a new key, or a delete."""
    if kind == "put":
        rig.source.put(NODE + b"lost", b'{"name":"lost"}')
        return NODE + b"lost"
    rig.source.delete(NODE + b"node-4")
    return NODE + b"node-4"


def cached(rig: Rig, source_key: bytes) -> list[bool]:
    key = source_key.replace(b"cilium/state/", b"cilium/cache/")
    return [key in rig.cache(t) for t in rig.targets]


def resyncs(rig: Rig, cause: Cause) -> list[float]:
    return [rig.resyncs(t, cause.value) for t in rig.targets]


def new_term(rig: Rig) -> None:
    """A new watcher process takes the source over, and the mesh settles."""
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()


def assert_exact(rig: Rig) -> None:
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()


@pytest.mark.parametrize("kind", ["put", "delete"])
def test_the_watcher_watching_through_it_resyncs(kind: str) -> None:
    """The watcher reconnects to the rewound source: the newest event it took is not there
    as it took it (a delete too, which no kept write stands for), so it lists again."""
    rig = synced()
    keep = rig.source.revision()
    key = change(rig, kind)
    rig.settle()
    assert cached(rig, key) == [kind == "put"] * 2
    lose_the_end(rig, keep)
    rig.settle()
    assert resyncs(rig, Cause.SOURCE_REPLACED) == [1, 1]
    assert cached(rig, key) == [kind == "delete"] * 2
    assert_exact(rig)


@pytest.mark.parametrize("kind", ["put", "delete"])
@pytest.mark.parametrize("end", ["recorded", "on exit"])
def test_a_new_term_reads_back_the_newest_event(kind: str, end: str) -> None:
    """The term that took the lost change recorded it as its newest event, at a fence poll
    or as it ended: the next term finds the source without it and lists again."""
    rig = synced()
    keep = rig.source.revision()
    key = change(rig, kind)
    rig.step()
    rig.work()  # landed
    if end == "recorded":
        rig.tick()
    rig.watcher.stop()
    rig.watcher._record_on_exit()
    lose_the_end(rig, keep)
    new_term(rig)
    assert resyncs(rig, Cause.SOURCE_REPLACED) == [1, 1]
    assert cached(rig, key) == [kind == "delete"] * 2
    assert_exact(rig)


@pytest.mark.parametrize("lost", [True, False])
def test_a_term_killed_before_recording_what_landed_is_not_resumed(lost: bool) -> None:
    """Batches landed after the last record of a term that was killed: nothing read back
    vouches for their positions, so the next term lists again, lost history or not."""
    rig = synced()
    keep = rig.source.revision()
    key = change(rig, "put")
    rig.step()
    rig.work()  # landed; no fence poll records it, and the process dies
    for t in rig.targets:
        fences = rig.mesh[t].items(b"kvmesh/a/fence/").values()
        assert max(FenceRecord.decode(f).pos[0] for f in fences) > keep
    if lost:
        lose_the_end(rig, keep)
    new_term(rig)
    assert resyncs(rig, Cause.UNRECORDED) == [1, 1]
    assert cached(rig, key) == [not lost] * 2
    assert_exact(rig)


def test_a_term_that_ends_recording_what_it_took_is_resumed() -> None:
    """A term stopped with batches still landing records its newest event as it ends: the
    next term reads it back and resumes past them, listing nothing."""
    rig = synced()
    rig.source.put(NODE + b"late", b"{}")
    rig.source.delete(NODE + b"node-2")
    rig.step()
    rig.watcher.stop()
    rig.watcher._record_on_exit()
    rig.work()  # they land after the term ended
    for t in rig.targets:
        record = json.loads(rig.mesh[t].get(progress_key("a")).value)  # type: ignore[union-attr]
        assert record["last"][1:3] == [rig.source.revision(), True]
    new_term(rig)
    assert [rig.metric(RESUMES, source_cluster="a", target_cluster=t) for t in rig.targets] == [
        1,
        1,
    ]
    assert [rig.resyncs(t) for t in rig.targets] == [0, 0]
    assert_exact(rig)


@pytest.mark.parametrize("how", ["watching", "new term"])
def test_revisions_lost_past_the_newest_event_are_watched_again(how: str) -> None:
    """The source loses only revisions past the newest event the watcher took, which held
    other clusters' writes and which progress notifications (and the record's revision)
    had passed; its owner then writes a synced key at one of them. The newest event still
    reads back, so nothing says the source changed: the watch goes on from that event,
    not from the revision delivered, and takes the new write."""
    rig = synced()
    rig.source.put(NODE + b"node-1", b'{"name":"node-1","v":2}')
    rig.settle()
    before = [rig.resyncs(t) for t in rig.targets]
    newest = rig.source.revision()
    for _ in range(3):
        rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    rig.tick(31.0)  # progress notifications, and a heartbeat record past the newest event
    for t in rig.targets:
        record = json.loads(rig.mesh[t].get(progress_key("a")).value)  # type: ignore[union-attr]
        assert record["rev"] == newest + 3 and record["last"][1] == newest
    if how == "new term":
        rig.watcher.stop()
    lose_the_end(rig, newest)
    reborn = NODE + b"reborn"
    rig.source.rewind(newest)
    rig.source.put(reborn, b"{}")  # at a revision the watcher had been told was empty
    lose_the_end(rig, rig.source.revision())  # pushed past again, nothing lost
    if how == "new term":
        rig.watcher = rig.new_watcher()
        rig.start()
    rig.settle()
    assert cached(rig, reborn) == [True, True]
    assert [rig.resyncs(t) for t in rig.targets] == (before if how == "watching" else [0, 0])
    assert_exact(rig)


def test_a_term_killed_before_its_first_record_is_not_resumed() -> None:
    """A resync opens a generation that has no progress record until its first fence poll:
    a term killed before it leaves fences that nothing vouches for."""
    rig = Rig()
    for i in range(10):
        rig.source.put(NODE + b"node-%d" % i, b"{}")
    rig.start()  # the first sync: a listing
    rig.step()
    rig.work()  # landed, fences done, and no fence poll yet
    for t in rig.targets:
        assert rig.mesh[t].get(progress_key("a")) is None
    new_term(rig)
    assert resyncs(rig, Cause.UNRECORDED) == [1, 1]
    assert_exact(rig)


def test_a_target_owed_a_resync_gets_no_record_as_the_term_ends() -> None:
    """Its record stays the one its last fence poll wrote: the term's feed may have begun
    after a history the target's fences are in (a reconnect found the source rewound and
    its resync has not come yet), and its newest event vouches for none of them."""
    rig = synced()
    owed = rig.watcher.targets[0]
    owed.owe(Cause.REQUESTED, "a test")
    rig.source.put(NODE + b"late", b"{}")
    rig.step()
    before = {t: rig.mesh[t].get(progress_key("a")) for t in rig.targets}
    rig.watcher.stop()
    rig.watcher._record_on_exit()
    after = {t: rig.mesh[t].get(progress_key("a")) for t in rig.targets}
    assert after[owed.name] == before[owed.name]
    other = next(t for t in rig.targets if t != owed.name)
    assert after[other] != before[other]


def test_a_batch_of_the_term_before_that_lands_during_the_read_back_is_seen() -> None:
    """The killed term's last batch lands while the next term reads back the source, after
    it read the fences: the fences it resumes on are read again once its generation is
    open (no batch of the old one can land after that)."""
    rig = synced()
    keep = rig.source.revision()
    key = change(rig, "put")
    rig.step()  # published, not landed; the records still vouch for `keep` only
    lose_the_end(rig, keep)
    rig.watcher = rig.new_watcher()
    for t in rig.watcher.targets:
        opened = t.control.open_generation

        def open_after_landing(records: Any, record: Any, opened: Any = opened) -> int:
            rig.work()  # the old term's batch lands just before the generation moves
            return int(opened(records, record))

        t.control.open_generation = open_after_landing  # type: ignore[method-assign]
    rig.start()
    rig.settle()
    assert resyncs(rig, Cause.UNRECORDED) == [1, 1]
    assert cached(rig, key) == [False, False]
    assert_exact(rig)


def test_the_same_key_written_again_at_the_same_revision_is_another_history() -> None:
    """The lost newest event was a write of a key that the new history writes again at the
    very same revision, with another value (an agent that rewrites its own key first): the
    value read back is not the one taken."""
    rig = synced()
    keep = rig.source.revision()
    rig.source.put(NODE + b"node-1", b'{"name":"node-1","v":"lost"}')
    rig.settle()
    rig.source.rewind(keep)
    rig.source.put(NODE + b"node-1", b'{"name":"node-1","v":"new"}')  # the same revision
    lose_the_end(rig, rig.source.revision())
    rig.settle()
    assert resyncs(rig, Cause.SOURCE_REPLACED) == [1, 1]
    assert_exact(rig)


def test_a_record_of_a_listing_compacted_away_resyncs_as_compacted() -> None:
    """The last record names no event (none came after the listing it vouches for) and the
    source compacted its history past that listing: no watch can resume there, whatever
    landed after the record, and the resync says so."""
    rig = synced()
    key = change(rig, "put")
    rig.step()
    rig.work()  # landed past the record, which names no event
    rig.source.compact()
    new_term(rig)
    assert resyncs(rig, Cause.COMPACTED) == [1, 1]
    assert cached(rig, key) == [True, True]
    assert_exact(rig)


@pytest.mark.parametrize("how", ["watching", "new term"])
@pytest.mark.parametrize("kind", ["put", "rewrite", "delete", "nothing"])
def test_a_history_lost_between_the_newest_listed_write_and_the_listing(
    kind: str, how: str
) -> None:
    """The watcher lists the source at a revision past its newest synced write (the
    revisions between held other clusters' writes) and takes no event after it. The source
    then loses those revisions, and its owner writes a synced key at one of them before it
    passes the listing's revision again: the newest listed write still reads back, but the
    source no longer shows, at the listing's revision, what was listed there. The watcher
    watching through it resyncs, and so does a new term, which finds the listing in the
    record. With nothing lost, neither resyncs."""
    rig = Rig()
    for i in range(10):
        rig.source.put(NODE + b"node-%d" % i, b'{"name":"node-%d"}' % i)
    top = rig.source.revision()
    for _ in range(3):
        rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    rig.start()  # lists at top + 3
    rig.settle()
    before = [rig.resyncs(t) for t in rig.targets]
    if how == "new term":
        rig.watcher.stop()
        rig.watcher._record_on_exit()
    if kind == "nothing":
        rig.source.restart()
    else:
        rig.source.rewind(top)
        if kind == "put":
            rig.source.put(NODE + b"reborn", b'{"name":"reborn"}')
        elif kind == "rewrite":
            rig.source.put(NODE + b"node-1", b'{"name":"node-1","v":2}')
        else:
            rig.source.delete(NODE + b"node-4")
        lose_the_end(rig, rig.source.revision())  # pushed past the listing, nothing lost
    if how == "new term":
        new_term(rig)
    rig.settle()
    if kind == "nothing":
        assert [rig.resyncs(t) for t in rig.targets] == (before if how == "watching" else [0, 0])
    else:
        assert resyncs(rig, Cause.SOURCE_REPLACED) == [1, 1]
    assert_exact(rig)


@pytest.mark.parametrize("end", ["killed", "on exit"])
def test_a_target_resynced_during_the_term_is_resumed_by_the_next(end: str) -> None:
    """A target wiped during the term is resynced at a listing past the newest event the
    watcher took (other clusters' writes moved the source's revision), and nothing synced
    changes after it. Its records, written by the fence poll or as the term ends, vouch
    for that listing: the next term resumes it from its fences, as it does the other."""
    rig = synced()
    for _ in range(3):
        rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    rig.mesh["b"].wipe()
    rig.settle()
    assert resyncs(rig, Cause.TARGET_WIPED) == [1, 0]
    if end == "on exit":
        rig.watcher.stop()
        rig.watcher._record_on_exit()
    new_term(rig)
    assert [rig.resyncs(t) for t in rig.targets] == [0, 0]
    assert_exact(rig)


def test_a_history_lost_as_the_term_starts_is_seen_once_its_watches_answer() -> None:
    """The source loses the end of its history after the new term read its newest event
    back, and is back before the term's watches begin: none of them breaks. The history is
    read back once more when the first one answers."""
    rig = synced()
    keep = rig.source.revision()
    key = change(rig, "put")
    rig.settle()
    rig.watcher.stop()
    rig.watcher._record_on_exit()
    rig.watcher = rig.new_watcher()
    feed = rig.watcher.feed
    start = feed.start

    def lose_then_start(start_rev: int) -> None:
        feed.start = start  # type: ignore[method-assign]
        lose_the_end(rig, keep)
        start(start_rev)

    feed.start = lose_then_start  # type: ignore[method-assign]
    rig.start()
    assert feed.start is start  # the read-back came before the loss
    rig.settle()
    assert resyncs(rig, Cause.SOURCE_REPLACED) == [1, 1]
    assert cached(rig, key) == [False, False]
    assert_exact(rig)


@pytest.mark.parametrize("how", ["watching", "new term"])
def test_a_resync_during_the_term_vouches_for_the_write_it_listed(how: str) -> None:
    """A target is resynced during the term at a listing whose newest write is a change the
    feed has not taken yet; its records vouch for that listing. The source then loses the
    revisions from just below that write, and its owner changes another key at one of
    them: the listing's newest write is gone. The watcher watching through it resyncs
    every target; a new term resyncs that one and resumes the other, whose records vouch
    for no more than what the source still holds."""
    rig = synced()
    keep = rig.source.revision()
    rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    rig.source.put(NODE + b"node-1", b'{"name":"node-1","v":2}')  # not taken yet
    for _ in range(3):
        rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    b = next(t for t in rig.watcher.targets if t.name == "b")
    b.need_resync = Cause.REQUESTED
    rig.watcher._resync([b])
    rig.work()
    rig.watcher.tick()  # decides on b's progress record, vouching for the listing
    rig.watcher.tick()  # and b's next read writes it first
    if how == "new term":
        rig.watcher.stop()  # killed: no record as it ends
    rig.source.rewind(keep + 1)
    rig.source.put(NODE + b"node-2", b'{"name":"node-2","v":2}')  # below the listed write
    lose_the_end(rig, rig.source.revision())  # pushed past the listing, nothing lost
    if how == "new term":
        rig.watcher = rig.new_watcher()
        rig.start()
    rig.settle()
    assert resyncs(rig, Cause.SOURCE_REPLACED) == ([1, 1] if how == "watching" else [1, 0])
    if how == "new term":
        assert rig.metric(RESUMES, source_cluster="a", target_cluster="c") == 1
    assert_exact(rig)


def test_a_resume_point_compacted_away_resyncs_that_target_alone() -> None:
    """One target's last record names the newest event, but the revision its watch would
    resume after is older (an exit record written while its fence poll lagged behind), and
    the source compacted its history past that revision: that target is resynced as
    compacted as the term starts; the other, whose record is fresh, resumes, instead of
    every target resyncing when the watch is refused."""
    rig = synced()
    before = rig.source.revision()
    rig.source.put(b"cilium/cache/nodes/v1/c/node-x", b"{}")
    change(rig, "put")
    rig.settle()
    rig.watcher.stop()
    rig.watcher._record_on_exit()
    record = json.loads(rig.mesh["b"].get(progress_key("a")).value)  # type: ignore[union-attr]
    assert record["last"][1] == before + 2
    record["rev"] = before
    rig.mesh["b"].put(progress_key("a"), json.dumps(record).encode())
    rig.source.compact(before + 1)
    new_term(rig)
    assert resyncs(rig, Cause.COMPACTED) == [1, 0]
    assert rig.metric(RESUMES, source_cluster="a", target_cluster="c") == 1
    assert_exact(rig)
