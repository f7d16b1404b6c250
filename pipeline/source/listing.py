"""Reading a source's synced state and a target's cache of it, page by page, through the etcd
client: what the watcher's resync and `kvmesh verify` list."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline.clients.etcd import EtcdClient
from pipeline.protocol.errors import BadInputError
from pipeline.protocol.layout import (
    RESOURCE_BY_NAME,
    RESOURCES,
    Layout,
    Resource,
    SourceCaps,
    parse_cluster_config,
    source_canary_key,
    source_caps,
)
from pipeline.protocol.snapshot import convert


@dataclass
class SourceState:
    revision: int
    items: dict[bytes, bytes]  # target key -> target value
    rejected: dict[bytes, str] = field(default_factory=dict)  # source key -> reason


@dataclass(frozen=True)
class Readiness:
    """What a source says, at one revision, about what to sync from it and what is complete:
    its capabilities (from its cluster config) and the resources whose source canary exists."""

    caps: SourceCaps
    config: bool  # the source holds a cluster config kvmesh could read
    canaries: frozenset[str] = frozenset()
    config_rev: int = 0  # the mod revision of its cluster config key (readable or not); 0: none
    refused: str = ""  # why the cluster config there is refused (bad input), if it is

    def waiting(self) -> frozenset[str]:
        """Resources whose deletes and target canary must wait for their source canary:
        those of a source that advertises synced canaries and has not written theirs."""
        if not self.caps.synced_canaries:
            return frozenset()
        return frozenset(
            r.name
            for r in RESOURCES
            if r.canary is not None and self.caps.syncs(r) and r.name not in self.canaries
        )

    def carried(self, before: Readiness | None) -> Readiness:
        """A source without a cluster config that had one before is taken to be rebuilding
        (a clustermesh-apiserver's etcd is in memory and starts empty): what it advertised
        still holds until it writes its config again."""
        if self.config or before is None or not before.config:
            return self
        return Readiness(before.caps, True, self.canaries, self.config_rev, self.refused)


def read_readiness(etcd: EtcdClient, layout: Layout, revision: int | None = None) -> Readiness:
    """The source's Readiness at *revision* (None: now). A cluster config that is bad input
    counts as none (the rejection itself is reported where the config is synced)."""
    config = RESOURCE_BY_NAME["config"]
    rev, kvs = etcd.scan(config.source_prefix(layout.source), revision, exact=True)
    cfg = None
    config_rev = 0
    refused = ""
    for kv in kvs:
        config_rev = kv.mod_revision
        try:
            cfg = parse_cluster_config(
                kv.key, kv.value, layout.cluster_id, layout.max_connected_clusters
            )
        except BadInputError as exc:
            cfg, refused = None, str(exc)
    # each canary key on its own, and only whether it exists: a scan of their prefix would
    # read whatever else the source put under it, and a read of a canary its value, on every
    # tick while a canary is awaited (a value may be as large as the source's etcd takes)
    found = {
        res.name
        for res in RESOURCES
        if res.canary is not None and etcd.exists(source_canary_key(layout.source, res), rev)
    }
    return Readiness(source_caps(cfg), cfg is not None, frozenset(found), config_rev, refused)


def iter_resource(
    etcd: EtcdClient,
    layout: Layout,
    res: Resource,
    revision: int,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
    newest: dict[str, tuple[bytes, int]] | None = None,
    tally: dict[str, tuple[int, int]] | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """(target key, target value) for every synced key of one resource of the source at
    *revision*, read page by page, in key order (the rewrite keeps the order: it swaps a
    prefix that is the same for every key of the resource). Bad input goes to *on_reject*
    and is skipped. *newest* gets the resource's newest write listed (source key, revision),
    a write of this etcd the feed can read back later (SourceFeed.anchors). *tally* gets,
    once the resource is read to its end, how many keys its range held at *revision* (bad
    input too) and the newest mod revision among them: what the source must still show at
    that revision (SourceFeed.listing_gone)."""
    _, kvs = etcd.scan(
        res.source_prefix(layout.source, layout.identities), revision, page, exact=res.single_key
    )
    top = count = 0
    for kv in kvs:
        count += 1
        if kv.mod_revision > top:
            top = kv.mod_revision
            if newest is not None:
                newest[res.name] = (kv.key, top)
        try:
            tkey, tvalue = convert(layout, res, kv.key, kv.value, max_bytes)
        except BadInputError as exc:
            on_reject(exc)
            continue
        assert tvalue is not None
        yield tkey, tvalue
    if tally is not None:
        tally[res.name] = (count, top)


def iter_source(
    etcd: EtcdClient,
    layout: Layout,
    revision: int,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
    caps: SourceCaps | None = None,
) -> Iterator[tuple[Resource, bytes, bytes]]:
    """(resource, target key, target value) for every synced key of the source (of the
    resources *caps* says are synced, if given)."""
    for res in RESOURCES:
        if caps is not None and not caps.syncs(res):
            continue
        for tkey, tvalue in iter_resource(
            etcd, layout, res, revision, page=page, max_bytes=max_bytes, on_reject=on_reject
        ):
            yield res, tkey, tvalue


def read_source(
    etcd: EtcdClient,
    layout: Layout,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None] | None = None,
) -> SourceState:
    """Every synced key of the source, listed at one revision."""
    state = SourceState(etcd.revision(), {})
    caps = read_readiness(etcd, layout, state.revision).caps

    def reject(exc: BadInputError) -> None:
        state.rejected[exc.key] = str(exc)
        if on_reject:
            on_reject(exc)

    for _res, tkey, tvalue in iter_source(
        etcd,
        layout,
        state.revision,
        page=page,
        max_bytes=max_bytes,
        on_reject=reject,
        caps=caps,
    ):
        state.items[tkey] = tvalue
    return state


def read_target(etcd: EtcdClient, source: str, *, page: int) -> dict[bytes, bytes]:
    """Everything the target caches of *source* (all cache prefixes, and its cluster config)."""
    out: dict[bytes, bytes] = {}
    for res in RESOURCES:
        _, kvs = etcd.scan(res.cache_scan_prefix(source), None, page, exact=res.single_key)
        for kv in kvs:
            out[kv.key] = kv.value
    return out
