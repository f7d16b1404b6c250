"""What a source advertises, honoured as Cilium's KVStoreMesh honours it: a source whose
cluster config has syncedCanaries loses nothing from the caches until it has written the
canary of a resource (a clustermesh-apiserver etcd restarts empty and is rebuilt), and
serviceexports and services follow its capabilities. The real watcher and applier on
in-memory etcds (tests/rig.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from pipeline.protocol.errors import RetryableError
from pipeline.protocol.layout import RESOURCES, source_canary_key
from pipeline.protocol.names import progress_key
from pipeline.source.listing import read_readiness
from pipeline.source.planner import Cause
from tests.rig import Rig

NODE = b"cilium/state/nodes/v1/a/"
SERVICE = b"cilium/state/services/v1/a/"
EXPORT = b"cilium/state/serviceexports/v1/a/"
IDENTITY = b"cilium/state/identities/v1/id/"
CONFIG = b"cilium/cluster-config/a"
RESUMES = "kvmesh_watcher_resumes_total"
CACHE_NODES = b"cilium/cache/nodes/v1/a/"
CACHE_IDS = b"cilium/cache/identities/v1/a/id/"


def config(**caps: object) -> bytes:
    return json.dumps({"id": 1, "capabilities": {"maxConnectedClusters": 255, **caps}}).encode()


def canary(resource: str) -> bytes:
    return source_canary_key("a", next(r for r in RESOURCES if r.name == resource))


def write_canaries(rig: Rig, *resources: str) -> None:
    names = resources or tuple(r.name for r in RESOURCES if r.canary is not None)
    for name in names:
        rig.source.put(canary(name), b"2026-11-28T00:00:00Z")


def fill(rig: Rig, nodes: range, identities: range, **caps: object) -> None:
    src = rig.source
    src.put(CONFIG, config(**caps))
    for i in nodes:
        src.put(NODE + f"node-{i}".encode(), b'{"name":"node-%d"}' % i)
    for i in identities:
        src.put(IDENTITY + str((1 << 16) + i).encode(), b"k8s:app=x%d" % i)


def synced_rig(settle: bool = True) -> Rig:
    """A source of 10 nodes and 20 identities that advertises synced canaries and has
    written them, its watcher started (and the mesh settled)."""
    rig = Rig()
    fill(rig, range(10), range(20), syncedCanaries=True)
    write_canaries(rig)
    rig.start()
    if settle:
        rig.settle()
    return rig


def back_empty(rig: Rig, seen: int, config_first: bool = False) -> None:
    """The source etcd comes back empty and, before any watcher looks, its revision passes
    *seen*: another cluster's watcher fills its cache in it (after its owner wrote its
    cluster config, at the revision it had, with *config_first*)."""
    rig.source.wipe()
    if config_first:
        rig.source.put(CONFIG, config(syncedCanaries=True))
    for i in range(seen + 5):
        rig.source.put(b"cilium/cache/nodes/v1/c/node-%d" % i, b"{}")


def written_back(rig: Rig) -> None:
    """The rebuilt source writes everything back, and its canaries: every cache is exact."""
    fill(rig, range(10), range(20), syncedCanaries=True)
    write_canaries(rig)
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()


def cached(rig: Rig, target: str, prefix: bytes) -> set[bytes]:
    return set(rig.mesh[target].items(prefix))


def test_a_source_restarting_empty_loses_no_key_until_its_canaries() -> None:
    rig = synced_rig()
    before = {t: rig.cache(t) for t in rig.targets}
    assert all(before[t] == rig.expected() for t in rig.targets)

    # The apiserver restarts: its etcd comes back empty, and it rebuilds slowly.
    rig.source.wipe()
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == before[t]  # not even the cluster config went
    fill(rig, range(5, 12), range(10), syncedCanaries=True)  # some old, some new
    rig.source.put(NODE + b"node-11", b'{"name":"gone again"}')
    rig.source.delete(NODE + b"node-11")  # a delete while waiting is held too
    rig.settle()
    assert rig.watcher.waiting == {"nodes", "services", "ipcache", "identities"}
    assert (
        rig.metric(
            "kvmesh_watcher_waiting_source_canary", source_cluster="a", resource="identities"
        )
        == 1
    )
    for t in rig.targets:
        now = rig.cache(t)
        assert set(before[t]) <= set(now)  # nothing lost
        assert CACHE_NODES + b"node-10" in now  # additions land at once
    old_canary = rig.mesh["b"].get(b"cilium/synced/a/cilium/cache/nodes/v1")
    assert old_canary is not None

    # The nodes are complete: their stale keys go, the identities still wait.
    write_canaries(rig, "nodes")
    rig.settle()
    assert rig.resyncs("b", Cause.SOURCE_CANARY.value) >= 1
    for t in rig.targets:
        assert cached(rig, t, CACHE_NODES) == {
            CACHE_NODES + f"node-{i}".encode() for i in range(5, 11)
        }
        assert set(rig.mesh[t].items(CACHE_IDS)) >= {
            k for k in before[t] if k.startswith(CACHE_IDS)
        }
    new_canary = rig.mesh["b"].get(b"cilium/synced/a/cilium/cache/nodes/v1")
    assert new_canary is not None and new_canary.mod_revision > old_canary.mod_revision
    ids_canary = rig.mesh["b"].get(b"cilium/synced/a/cilium/cache/identities/v1")
    assert ids_canary is not None and ids_canary.mod_revision < new_canary.mod_revision

    write_canaries(rig)
    rig.settle()
    assert rig.watcher.waiting == frozenset()
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()
        assert len(cached(rig, t, CACHE_IDS)) == 10


@pytest.mark.parametrize("last_seen", ["listed", "node", "node deleted since"])
def test_a_source_back_empty_past_the_revision_watched_is_noticed(last_seen: str) -> None:
    """The source etcd comes back empty, and before the watcher reconnects its revision is
    past the last one watched: the other clusters' watchers wrote their caches into it, and
    its owner wrote its cluster config first, at the revision it had before. The revision
    and the config say nothing then; another write the watcher saw (the newest of each
    resource its resync listed, or a node written since, even one deleted since) is not at
    its revision any more, which says the etcd is another one. Nothing is deleted until
    the canaries."""
    rig = synced_rig()
    config_rev = rig.source.get(CONFIG).mod_revision  # type: ignore[union-attr]
    newest_node = max(range(10), key=lambda i: rig.source.get(NODE + b"node-%d" % i).mod_revision)  # type: ignore[union-attr]
    anchors = rig.watcher.feed.anchors
    assert set(anchors) == {"config", "nodes", "identities"}
    assert anchors["config"] == (CONFIG, config_rev)
    assert anchors["nodes"][0] == NODE + b"node-%d" % newest_node
    if last_seen != "listed":
        rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":2}')
        rig.settle()
        written = rig.source.revision()
        if last_seen == "node deleted since":
            rig.source.delete(NODE + b"node-3")
            rig.settle()
        assert rig.watcher.feed.anchors["nodes"] == (NODE + b"node-3", written)
    before = {t: rig.cache(t) for t in rig.targets}
    seen = rig.source.revision()
    replaced = rig.resyncs("b", Cause.SOURCE_REPLACED.value)

    back_empty(rig, seen, config_first=True)
    assert rig.source.get(CONFIG).mod_revision == config_rev  # type: ignore[union-attr]
    rig.settle()
    assert rig.resyncs("b", Cause.SOURCE_REPLACED.value) > replaced
    for t in rig.targets:
        assert rig.cache(t) == before[t]
    written_back(rig)


def test_a_source_back_with_its_data_is_not_taken_for_another() -> None:
    """A source etcd that restarts with its data (or a stream that breaks) resumes where
    the watch left off, whatever happened since to the keys whose writes the watcher keeps:
    each write is still there at its revision."""
    rig = synced_rig()
    rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":2}')
    rig.source.delete(NODE + b"node-4")  # the newest event deletes another key
    rig.settle()
    assert rig.watcher.feed.anchors["nodes"][0] == NODE + b"node-3"
    resyncs = {t: rig.resyncs(t, Cause.SOURCE_REPLACED.value) for t in rig.targets}
    for change in ("rewritten", "deleted"):
        # the watcher does not see these before the restart breaks its streams
        if change == "rewritten":
            rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":3}')
            rig.source.put(CONFIG, config(syncedCanaries=True, maxConnectedClusters=255))
        else:
            rig.source.delete(NODE + b"node-3")
            rig.source.delete(CONFIG)
        rig.source.restart()
        rig.settle()
        assert {t: rig.resyncs(t, Cause.SOURCE_REPLACED.value) for t in rig.targets} == resyncs
        for t in rig.targets:
            assert rig.cache(t) == rig.expected()


def test_without_the_capability_a_resync_deletes_at_once() -> None:
    """A source that does not advertise synced canaries keeps today's behaviour: the resync
    after its restart deletes what it has not written back."""
    rig = Rig()
    fill(rig, range(10), range(20))
    rig.start()
    rig.settle()
    rig.source.wipe()
    fill(rig, range(5), range(10))
    rig.settle()
    assert rig.watcher.waiting == frozenset()
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()
        assert len(cached(rig, t, CACHE_NODES)) == 5


def test_canaries_are_written_per_resource_as_each_completes() -> None:
    """A resource's target canary does not wait for the resources listed after it: with
    the identities' shards held back by a worker, the nodes' canary is written."""
    rig = Rig()
    fill(rig, range(5), range(50), syncedCanaries=True)
    write_canaries(rig)
    rig.start()
    node_batches = [b for b in rig.queue.batches if not b.shard.startswith("identities")]
    rig.queue.batches = [b for b in rig.queue.batches if b.shard.startswith("identities")]
    rig.work(node_batches)
    rig.tick()
    for t in rig.targets:
        assert rig.mesh[t].get(b"cilium/synced/a/cilium/cache/nodes/v1") is not None
        assert rig.mesh[t].get(b"cilium/synced/a/cilium/cache/identities/v1") is None
    rig.settle()
    for t in rig.targets:
        assert rig.mesh[t].get(b"cilium/synced/a/cilium/cache/identities/v1") is not None


def test_serviceexports_and_services_follow_the_capabilities() -> None:
    rig = Rig()
    fill(rig, range(3), range(3))  # no serviceExportsEnabled: exports are not supported
    rig.source.put(EXPORT + b"ns/web", b'{"name":"web"}')
    rig.source.put(SERVICE + b"ns/web", b'{"name":"web"}')
    rig.start()
    rig.settle()
    exports = b"cilium/cache/serviceexports/v1/a/"
    services = b"cilium/cache/services/v1/a/"
    for t in rig.targets:
        assert cached(rig, t, exports) == set()
        assert cached(rig, t, services) == {services + b"ns/web"}
        # a resource that is not synced is complete, empty: agents need not wait for it
        assert rig.mesh[t].get(b"cilium/synced/a/cilium/cache/serviceexports/v1") is not None

    rig.source.put(CONFIG, config(serviceExportsEnabled=False))  # supported (none enabled)
    rig.settle()
    assert rig.resyncs("b", Cause.SOURCE_CONFIG.value) == 1
    rig.source.put(EXPORT + b"ns/api", b'{"name":"api"}')
    rig.settle()
    for t in rig.targets:
        assert cached(rig, t, exports) == {exports + b"ns/web", exports + b"ns/api"}

    rig.source.put(
        CONFIG, config(serviceExportsEnabled=True, endpointSlicesExportMode="EndpointSlicesOnly")
    )
    rig.source.put(SERVICE + b"ns/api", b'{"name":"api"}')
    rig.settle()
    for t in rig.targets:
        assert cached(rig, t, services) == set()  # drained, and no new one synced
        assert len(cached(rig, t, exports)) == 2
        assert rig.cache(t) == rig.expected()


def test_a_watcher_starting_while_the_source_rebuilds_deletes_nothing() -> None:
    """A fresh watcher (a restart, a standby) meets a source that restarted empty and has
    not written its cluster config yet: the cached config in the targets says the source
    had one, so it is taken to be rebuilding and nothing is deleted until its canaries."""
    rig = synced_rig()
    before = {t: rig.cache(t) for t in rig.targets}
    rig.source.wipe()
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == before[t]
    fill(rig, range(3), range(5), syncedCanaries=True)
    rig.settle()
    for t in rig.targets:
        assert set(before[t]) <= set(rig.cache(t))
    write_canaries(rig)
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()


def test_a_watcher_that_cannot_read_the_targets_does_not_take_a_rebuild_for_no_config() -> None:
    """The same, while no target answers as the watcher starts: whether one caches the
    source's config is unknown, so the start fails and is tried again (as the watcher's
    loop does) instead of taking the source for one without a config, whose resync would
    empty the caches once the targets are back."""
    rig = synced_rig()
    before = {t: rig.cache(t) for t in rig.targets}
    rig.source.wipe()
    rig.watcher = rig.new_watcher()
    for t in rig.targets:
        rig.mesh[t].set_down(True)
    with pytest.raises(RetryableError, match="cannot be read"):
        rig.start()
    for t in rig.targets:
        rig.mesh[t].set_down(False)
    rig.start()
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == before[t]
    written_back(rig)


def test_deletes_held_by_one_watcher_are_sent_by_the_next() -> None:
    """The watcher that held deletes is gone when the canary appears; its successor finds
    the held record in the targets, resyncs, and the stale keys go."""
    rig = synced_rig()
    rig.source.wipe()
    fill(rig, range(4), range(8), syncedCanaries=True)
    rig.settle()
    assert len(cached(rig, "b", CACHE_NODES)) == 10  # held
    write_canaries(rig)  # while no watcher runs
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()
        assert rig.mesh[t].get(b"kvmesh/a/held") is None
    assert rig.resyncs("b", Cause.SOURCE_CANARY.value) == 1


def test_a_bad_value_does_not_delete_a_held_key() -> None:
    """A put that turns a cached key into bad input deletes that key, except while its
    resource waits for its source canary."""
    rig = Rig()
    fill(rig, range(3), range(3), syncedCanaries=True)
    write_canaries(rig)
    rig.start()
    rig.settle()
    rig.source.wipe()
    fill(rig, range(3), range(3), syncedCanaries=True)
    rig.source.put(IDENTITY + str((1 << 16) + 1).encode(), b"x" * 2_000_000)  # too large
    rig.settle()
    assert CACHE_IDS + str((1 << 16) + 1).encode() in cached(rig, "b", CACHE_IDS)


@pytest.mark.parametrize("source", ["back empty", "back with its data"])
def test_a_new_term_reads_back_the_writes_its_predecessor_saw(source: str) -> None:
    """No watcher of the source runs while its etcd restarts (a standby takes over, or the
    watcher restarts too). Back empty and refilled past the targets' fences, the source
    lacks the writes the last term recorded with its progress: the new term resyncs (and
    deletes nothing before the canaries) instead of resuming on another history. Back
    with its data, rewritten since, it resumes."""
    rig = synced_rig()
    rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":2}')
    rig.settle()
    written = rig.source.revision()
    for t in rig.targets:
        progress = rig.mesh[t].get(progress_key("a"))
        assert progress is not None
        assert [NODE + b"node-3", written] in [
            [base64.b64decode(k), m] for k, m in json.loads(progress.value)["seen"]
        ]
    before = {t: rig.cache(t) for t in rig.targets}
    rig.watcher.stop()
    if source == "back empty":
        seen = rig.source.revision()
        back_empty(rig, seen)
    else:
        rig.source.restart()
        rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":3}')
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    replaced = [rig.resyncs(t, Cause.SOURCE_REPLACED.value) for t in rig.targets]
    resumed = [rig.metric(RESUMES, source_cluster="a", target_cluster=t) for t in rig.targets]
    if source == "back empty":
        assert replaced == [1] * len(rig.targets) and resumed == [0] * len(rig.targets)
        for t in rig.targets:
            assert rig.cache(t) == before[t]
    else:
        assert replaced == [0] * len(rig.targets) and resumed == [1] * len(rig.targets)
        for t in rig.targets:
            assert rig.cache(t) == rig.expected()


def test_a_term_regained_takes_no_config_of_an_earlier_term_for_this_etcd() -> None:
    """A watcher that lost its lease and regains it resumes with the cluster config as the
    source holds it now: a config revision kept from its earlier term (of an etcd replaced
    meanwhile, or rewritten) is no write of this etcd, and must not make the first
    reconnect look like a replaced source."""
    rig = synced_rig()
    rig.watcher.feed.config_rev = 1  # what an earlier term saw of another etcd
    rig.start()  # the term regained: every target resumes
    rig.settle()
    config = rig.source.get(CONFIG)
    assert config is not None
    assert rig.watcher.feed.anchors["config"] == (CONFIG, config.mod_revision)
    rig.source.restart()
    rig.settle()
    assert [rig.resyncs(t, Cause.SOURCE_REPLACED.value) for t in rig.targets] == [0, 0]
    for t in rig.targets:
        assert rig.cache(t) == rig.expected()


def test_terms_that_see_no_change_pass_on_what_the_first_one_saw() -> None:
    """Terms that resume and see nothing change still leave their successor writes to read
    back: each resumed generation's progress record carries the ones just read back, so a
    source back empty after two quiet terms is still noticed at the third."""
    rig = synced_rig(settle=False)
    rig.source.put(NODE + b"node-3", b'{"name":"node-3","v":2}')
    rig.settle()
    for polls in (True, False):  # two quiet terms, in processes of their own; the second
        rig.watcher.stop()  # ends before its first fence poll
        rig.watcher = rig.new_watcher()
        rig.start()
        if polls:
            rig.settle()
        assert rig.watcher.feed.anchors.get("nodes", (b"", 0))[0] == NODE + b"node-3"
    before = {t: rig.cache(t) for t in rig.targets}
    rig.watcher.stop()
    seen = rig.source.revision()
    back_empty(rig, seen, config_first=True)
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    assert [rig.resyncs(t, Cause.SOURCE_REPLACED.value) for t in rig.targets] == [1, 1]
    for t in rig.targets:
        assert rig.cache(t) == before[t]


def test_the_canaries_are_read_key_by_key() -> None:
    """While a canary is awaited the source's canaries are read on every tick: whether each
    known canary key exists, so that neither their values nor whatever else the source
    writes under their prefix (values of any size) is read."""
    rig = Rig()
    fill(rig, range(1), range(1), syncedCanaries=True)
    write_canaries(rig, "nodes")
    rig.source.put(b"cilium/synced/a/cilium/state/junk/v1", b"x" * 100_000)
    rig.source.put(canary("nodes") + b"/more", b"y" * 100_000)
    read: list[bytes] = []
    source = rig.source

    class Recording:
        def scan(self, prefix: bytes, revision: int | None = None, **kw: Any) -> Any:
            rev, kvs = source.scan(prefix, revision, **kw)
            return rev, iter([kv for kv in kvs if not read.append(kv.key)])

        def exists(self, key: bytes, revision: int | None = None) -> bool:
            return source.exists(key, revision)  # no value read

    ready = read_readiness(Recording(), rig.watcher.layout)  # type: ignore[arg-type]
    assert ready.canaries == {"nodes"} and ready.config
    assert read == [CONFIG]


@pytest.mark.parametrize("char", ["é", "\x7f"])
def test_a_large_config_of_other_scripts_still_guards_a_restart(char: str) -> None:
    """The cached copy of a cluster config escapes every character outside printable ASCII
    (DEL too, six bytes for one), and may grow past the limit a source's own config is
    held to: read back, it is still the config the source had, so a source back empty is
    still waited for."""
    rig = Rig()
    shell = {"id": 1, "capabilities": {"syncedCanaries": True}, "note": ""}
    room = 64 * 1024 - len(json.dumps(shell, ensure_ascii=False).encode())
    shell["note"] = char * (room // len(char.encode()))
    big = json.dumps(shell, ensure_ascii=False).encode()
    assert 64 * 1024 - 2 < len(big) <= 64 * 1024
    rig.source.put(CONFIG, big)
    fill_nodes = [NODE + f"node-{i}".encode() for i in range(5)]
    for key in fill_nodes:
        rig.source.put(key, b"{}")
    write_canaries(rig)
    rig.start()
    rig.settle()
    copy = rig.mesh["b"].get(CONFIG)
    growth = 6 // len(char.encode())  # six bytes for each character: é is two, DEL one
    assert copy is not None and len(copy.value) > 0.99 * growth * 64 * 1024
    before = {t: rig.cache(t) for t in rig.targets}
    rig.watcher.stop()
    back_empty(rig, rig.source.revision())  # no config, no canaries, no nodes
    rig.watcher = rig.new_watcher()
    rig.start()
    rig.settle()
    for t in rig.targets:
        assert rig.cache(t) == before[t]  # nothing deleted while the source rebuilds
