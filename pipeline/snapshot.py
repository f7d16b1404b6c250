"""Snapshots and diffs: the filtered, rewritten state of a source at one revision, what a
target caches of it, and the difference. Shared by the watcher's resync and `kvmesh verify`,
so the two can never disagree about what "in sync" means."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .batching import Change, check_size
from .errors import BadInputError
from .etcd import Etcd
from .layout import RESOURCES, Layout, Op, Resource


@dataclass
class SourceState:
    revision: int
    items: dict[bytes, bytes]  # target key -> target value
    resource_of: dict[bytes, Resource]
    rejected: dict[bytes, str] = field(default_factory=dict)  # source key -> reason


def convert(
    layout: Layout, resource: Resource, key: bytes, value: bytes | None, max_bytes: int
) -> tuple[bytes, bytes | None]:
    """Rewrite one source change to (target key, target value); raises BadInputError."""
    target_key = layout.rewrite(resource, key)
    if value is None:
        return target_key, None
    target_value = layout.transform_value(resource, key, value)
    check_size(Change(target_key, Op.PUT, target_value, (0, 0)), max_bytes)
    return target_key, target_value


def read_source(
    etcd: Etcd,
    layout: Layout,
    *,
    page: int,
    max_bytes: int,
    on_reject: Callable[[BadInputError], None] | None = None,
) -> SourceState:
    """Every synced key of the source, listed at one revision."""
    revision: int | None = None
    state = SourceState(0, {}, {})
    for res in RESOURCES:
        rev, kvs = etcd.scan(
            res.source_prefix(layout.source, layout.identities),
            revision,
            page,
            exact=res.single_key,
        )
        revision = rev
        for kv in kvs:
            try:
                tkey, tvalue = convert(layout, res, kv.key, kv.value, max_bytes)
            except BadInputError as exc:
                state.rejected[kv.key] = str(exc)
                if on_reject:
                    on_reject(exc)
                continue
            assert tvalue is not None
            state.items[tkey] = tvalue
            state.resource_of[tkey] = res
    state.revision = revision or 0
    return state


def read_target(etcd: Etcd, source: str, *, page: int) -> dict[bytes, bytes]:
    """Everything the target caches of *source* (all cache prefixes, and its cluster config)."""
    out: dict[bytes, bytes] = {}
    for res in RESOURCES:
        _, kvs = etcd.scan(res.cache_scan_prefix(source), None, page, exact=res.single_key)
        for kv in kvs:
            out[kv.key] = kv.value
    return out


def resource_of_target_key(source: str, key: bytes) -> Resource | None:
    for res in RESOURCES:
        scan = res.cache_scan_prefix(source)
        if (key == scan) if res.single_key else key.startswith(scan):
            return res
    return None


@dataclass
class Diff:
    missing: dict[bytes, bytes]  # in the source, not in the target
    different: dict[bytes, bytes]  # in both, other value (source's value)
    extra: list[bytes]  # in the target only

    @property
    def equal(self) -> bool:
        return not (self.missing or self.different or self.extra)


def diff(desired: dict[bytes, bytes], actual: dict[bytes, bytes]) -> Diff:
    missing: dict[bytes, bytes] = {}
    different: dict[bytes, bytes] = {}
    for key, value in desired.items():
        have = actual.get(key)
        if have is None:
            missing[key] = value
        elif have != value:
            different[key] = value
    extra = sorted(k for k in actual if k not in desired)
    return Diff(missing, different, extra)
