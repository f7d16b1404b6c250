"""The source watch against a real etcd: a long history, which etcd sends in one response
(in fragments), is handed over in parts of bounded size, each ending on a whole revision."""

from __future__ import annotations

import threading

import pytest

from pipeline.clients import etcd as etcd_module
from pipeline.clients.etcd import Etcd, Event, Put, events_bytes

from ..harness import Servers, check_reads_at_a_past_revision, eventually

pytestmark = pytest.mark.integration

PREFIX = b"cilium/state/services/v1/a/"
VALUE = b"v" * 200_000
CHUNK = 1 << 20


def test_a_long_history_is_handed_over_in_parts_of_whole_revisions(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd_module, "WATCH_CHUNK_BYTES", CHUNK)
    etcd = Etcd(servers.etcd().cluster("a", 1), timeout=10)
    start = etcd.revision() + 1
    # 24 revisions of one put, then one of six (1.2 MB: over a part alone), then 12 more
    for i in range(24):
        etcd.put(PREFIX + b"one-%d" % i, VALUE)
    etcd.txn([], [Put(PREFIX + b"six-%d" % i, VALUE) for i in range(6)])
    for i in range(12):
        etcd.put(PREFIX + b"two-%d" % i, VALUE)
    last = etcd.revision()
    # the watch starts behind: etcd sends the whole history at once
    parts = _watched(etcd, start, 42)
    events = [ev for evs, _ in parts for ev in evs]
    assert [ev.revision for ev in events] == sorted(ev.revision for ev in events)
    assert [ev.revision for ev in events][-1] == last
    revs = [[ev.revision for ev in evs] for evs, _ in parts]
    assert len(parts) > 1
    for i, (evs, header_rev) in enumerate(parts):
        if i + 1 < len(parts):
            # no revision is split between two parts; a part says the last revision it holds
            assert revs[i][-1] < revs[i + 1][0]
            assert header_rev == evs[-1].revision
        # a part grows past its size only with its last revision, which it keeps whole
        assert events_bytes([ev for ev in evs if ev.revision != evs[-1].revision]) < CHUNK
    six = [evs for evs, _ in parts if any(ev.key.startswith(PREFIX + b"six-") for ev in evs)]
    assert len(six) == 1 and sum(ev.key.startswith(PREFIX + b"six-") for ev in six[0]) == 6


def test_a_revision_larger_than_the_parts_goes_in_parts_that_say_the_revision_before(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete of a whole prefix is one revision of as many events as keys: it is handed
    over in parts too, and a part that ends inside it does not claim it delivered."""
    chunk = 8 << 10
    monkeypatch.setattr(etcd_module, "WATCH_CHUNK_BYTES", chunk)
    etcd = Etcd(servers.etcd().cluster("a", 1), timeout=10)
    start = etcd.revision() + 1
    for i in range(40):
        etcd.txn([], [Put(PREFIX + b"k-%03d-%d" % (i, j), b"v" * 100) for j in range(5)])
    etcd.delete_prefix(PREFIX)  # 200 deletes at one revision: about 50 KB of events
    last = etcd.revision()
    parts = _watched(etcd, start, 400)
    deletes = [ev for evs, _ in parts for ev in evs if ev.revision == last]
    assert [ev.index for ev in deletes] == list(range(200))
    inside = [(evs, h) for evs, h in parts if evs[-1].revision == last and h < last]
    assert inside  # the delete revision was split
    for evs, header_rev in parts:
        if header_rev < evs[-1].revision:
            assert header_rev == evs[-1].revision - 1
        # at most the split size, and one event beyond it
        assert events_bytes(evs[:-1]) < etcd_module.WATCH_SPLIT_PARTS * chunk


def _watched(etcd: Etcd, start: int, count: int) -> list[tuple[list[Event], int]]:
    """What a watch of PREFIX from *start* hands over, (events, header revision) per part,
    until *count* events came; then the watch and the client are closed."""
    parts: list[tuple[list[Event], int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def on_events(events: list[Event], header_rev: int) -> None:
        with lock:
            parts.append((list(events), header_rev))

    def seen() -> int:
        with lock:
            return sum(len(evs) for evs, _ in parts)

    stream = etcd.watch(PREFIX, start, on_events, errors.append)
    try:
        eventually(lambda: seen() == count or errors, timeout=60, what="every event delivered")
    finally:
        stream.stop()
        etcd.close()
    assert not errors
    return parts


def test_reads_at_a_past_revision(servers: Servers) -> None:
    """The reads a listing is checked with, against a real etcd (etcd applies no mod
    revision filter to a count-only read: a count and a newest write are two reads)."""
    check_reads_at_a_past_revision(Etcd(servers.etcd().cluster("a", 1), timeout=10), PREFIX)
