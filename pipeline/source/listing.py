"""Reading a source's synced state and a target's cache of it, page by page, through the etcd
client: what the watcher's resync and `kvmesh verify` list."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline.clients.etcd import EtcdClient
from pipeline.protocol.errors import BadInputError
from pipeline.protocol.layout import RESOURCES, Layout, Resource
from pipeline.protocol.snapshot import convert


@dataclass
class SourceState:
    revision: int
    items: dict[bytes, bytes]  # target key -> target value
    rejected: dict[bytes, str] = field(default_factory=dict)  # source key -> reason


def iter_resource(
    etcd: EtcdClient,
    layout: Layout,
    res: Resource,
    revision: int,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
) -> Iterator[tuple[bytes, bytes]]:
    """(target key, target value) for every synced key of one resource of the source at
    *revision*, read page by page, in key order (the rewrite keeps the order: it swaps a
    prefix that is the same for every key of the resource). Bad input goes to *on_reject*
    and is skipped."""
    _, kvs = etcd.scan(
        res.source_prefix(layout.source, layout.identities), revision, page, exact=res.single_key
    )
    for kv in kvs:
        try:
            tkey, tvalue = convert(layout, res, kv.key, kv.value, max_bytes)
        except BadInputError as exc:
            on_reject(exc)
            continue
        assert tvalue is not None
        yield tkey, tvalue


def iter_source(
    etcd: EtcdClient,
    layout: Layout,
    revision: int,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None],
) -> Iterator[tuple[Resource, bytes, bytes]]:
    """(resource, target key, target value) for every synced key of the source."""
    for res in RESOURCES:
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

    def reject(exc: BadInputError) -> None:
        state.rejected[exc.key] = str(exc)
        if on_reject:
            on_reject(exc)

    for _res, tkey, tvalue in iter_source(
        etcd, layout, state.revision, page=page, max_bytes=max_bytes, on_reject=reject
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
