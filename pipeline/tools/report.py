"""Read-only views of a mesh: the per-pair comparison behind `kvmesh verify` and the
per-pair figures behind `kvmesh status` and the lab's live view. A MeshView keeps its etcd
and Redis clients open between calls, so a view refreshed every second costs no new
connections."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.clients.broker import Broker
from pipeline.clients.etcd import Etcd
from pipeline.config import READ, WRITE, ClusterConfig, Settings
from pipeline.protocol.errors import RetryableError, show, show_key
from pipeline.protocol.layout import (
    RESOURCE_BY_NAME,
    RESOURCES,
    Layout,
    canary_key,
    canary_prefix,
)
from pipeline.protocol.names import progress_key, queue_name, rejected_key, rejected_prefix
from pipeline.protocol.snapshot import Diff, diff
from pipeline.source.listing import SourceState, read_readiness, read_source, read_target


@dataclass(frozen=True)
class PairStatus:
    """What `kvmesh status` shows of one (source, target) pair. STABLE API: its fields are
    the keys of `kvmesh status --json`."""

    source: str
    target: str
    queue: int | None  # tasks waiting in the source's queue; None: the broker is unreachable
    source_revision: int
    applied_revision: int  # the target reflects every synced source event up to here
    lag_revisions: int | None  # revisions after that which put a synced key; None: unknown
    progress_age_s: float | None  # since the watcher last wrote the progress record
    canaries: int  # synced canaries present in the target
    source_keys: int  # under the synced prefixes of the source (identity IDs only)
    cached_keys: int  # the target holds of this source, its cluster config included
    workers: dict[str, int] = field(default_factory=dict)  # the workers' outcome counters
    # resources whose source canary the source has not written (it advertises them): their
    # deletes and target canary wait; the lab shows "waiting for source canary"
    waiting_for_source_canary: list[str] = field(default_factory=list)
    # what `verify` counts (None when status was asked for the cheap counts only): the keys
    # the target should hold (what passes the layout, less what the target refused), and
    # the keys not synced as bad input or refused by the target
    expected_keys: int | None = None
    rejected_keys: int | None = None


@dataclass(frozen=True)
class _Pair:
    source: str
    target: str
    source_etcd: Etcd
    target_etcd: Etcd
    layout: Layout
    state: SourceState
    diff: Diff


def _examples(d: Diff, examples: int) -> list[str]:
    """Up to *examples* keys of each kind of difference, one line each."""
    lines: list[str] = []
    for kind, keys in (
        ("missing", sorted(d.missing)),
        ("extra", d.extra),
        ("different", sorted(d.different)),
    ):
        lines += [f"    {kind}: {show_key(key)}" for key in keys[:examples]]
    return lines


class MeshView:
    """Read-only access to every cluster of a mesh and to its broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._etcd: dict[tuple[str, str], Etcd] = {}
        self._broker: Broker | None = None

    def __enter__(self) -> MeshView:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self._etcd.values():
            client.close()
        self._etcd = {}
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def etcd(self, cluster: ClusterConfig, role: str) -> Etcd:
        key = (cluster.name, role)
        if key not in self._etcd:
            self._etcd[key] = Etcd(cluster, self.settings.sync.etcd_timeout, role)
        return self._etcd[key]

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = Broker.of(self.settings)
        return self._broker

    # -- verify ---------------------------------------------------------------------------

    def _pairs(self, identities: str = "") -> Iterator[_Pair]:
        """Every (source, target) pair with the source's synced state, listed once per
        source (with the *identities* mode, if given), and the target's difference from it."""
        settings = self.settings
        for src in settings.sources:
            targets = settings.targets_of(src.name)
            if not targets:
                continue
            layout = settings.layout_of(src)
            if identities:
                layout = replace(layout, identities=identities)
            source = self.etcd(src, READ)
            state = read_source(
                source,
                layout,
                page=settings.sync.page_size,
                max_bytes=settings.sync.max_batch_bytes,
            )
            for tgt in targets:
                target = self.etcd(tgt, WRITE)
                d = diff(state.items, read_target(target, src.name, page=settings.sync.page_size))
                yield _Pair(src.name, tgt.name, source, target, layout, state, d)

    def verify(self, examples: int) -> tuple[bool, list[str]]:
        """Compare every target with its source, key by key and byte by byte."""
        lines: list[str] = []
        all_equal = True
        for pair in self._pairs():
            d, state = pair.diff, pair.state
            refused = refused_by_target(pair.target_etcd, pair.source, d.missing)
            for key in refused:  # the target refused them (too large): not missing
                del d.missing[key]
            rejected = [reason for _k, reason in sorted(state.rejected.items())]
            rejected += [f"{show_key(k)}: {reason}" for k, reason in sorted(refused.items())]
            expected = len(state.items) - len(refused)  # as `status` counts them
            lines.append(
                f"{pair.source} -> {pair.target}: {'EQUAL' if d.equal else 'DIFFERENT'}: "
                f"{expected} keys, missing {len(d.missing)}, extra {len(d.extra)}, "
                f"different {len(d.different)}, rejected {len(rejected)}"
            )
            lines += _examples(d, examples)
            lines += [f"    rejected: {reason}" for reason in rejected[:examples]]
            all_equal = all_equal and d.equal
        return all_equal, lines

    def verify_kvstoremesh(self, examples: int) -> tuple[bool, list[str]]:
        """Prove that every target holds exactly what Cilium's KVStoreMesh would write for
        each of its sources, apart from canary timestamps and lease IDs: the synced keys with
        identities by ID only (KVStoreMesh never copies `value/` keys), the resources the
        source's capabilities enable, its cluster config in the bytes KVStoreMesh writes, one
        RFC 3339 synced canary per resource, and nothing else of that source."""
        lines: list[str] = []
        all_equal = True
        waiting: dict[str, frozenset[str]] = {}
        for pair in self._pairs(identities="id"):
            d, state = pair.diff, pair.state
            if pair.source not in waiting:
                ready = read_readiness(pair.source_etcd, pair.layout, state.revision)
                waiting[pair.source] = ready.waiting()
            problems = [f"waiting for source canary: {n}" for n in sorted(waiting[pair.source])]
            # kvmesh does not copy bad input; KVStoreMesh may, so the layouts can differ
            problems += [f"not synced: {reason}" for _k, reason in sorted(state.rejected.items())]
            problems += _canary_problems(pair.target_etcd, pair.source)
            equal = d.equal and not problems
            lines.append(
                f"{pair.source} -> {pair.target}: KVStoreMesh layout "
                f"{'EQUAL' if equal else 'DIFFERENT'}: {len(state.items)} keys, "
                f"missing {len(d.missing)}, extra {len(d.extra)}, "
                f"different {len(d.different)}, canaries "
                f"{'ok' if not problems else f'{len(problems)} problems'}"
            )
            lines += _examples(d, examples)
            lines += [f"    {p}" for p in problems[:examples]]
            all_equal = all_equal and equal
        return all_equal, lines

    # -- status ---------------------------------------------------------------------------

    def status(self, exact: bool = True) -> list[PairStatus]:
        """Every pair's status. *exact* also lists each source once, as `verify` does, to
        count the keys each target should hold and those not synced (expected_keys,
        rejected_keys); without it only cheap counts are read (the lab's live view)."""
        rows: list[PairStatus] = []
        page = self.settings.sync.page_size
        for src in self.settings.sources:
            try:
                depth: int | None = self.broker.depth(queue_name(src.name))
            except RetryableError:
                depth = None
            source = self.etcd(src, READ)
            layout = self.settings.layout_of(src)
            revision = source.revision()
            waiting = sorted(read_readiness(source, layout, revision).waiting())
            source_keys = sum(
                source.count(res.source_prefix(src.name, layout.identities))
                for res in RESOURCES
                if not res.single_key
            )
            state = None
            if exact and self.settings.targets_of(src.name):
                state = read_source(
                    source, layout, page=page, max_bytes=self.settings.sync.max_batch_bytes
                )
            for tgt in self.settings.targets_of(src.name):
                target = self.etcd(tgt, WRITE)
                expected: int | None = None
                rejected: int | None = None
                if state is not None:
                    held = cached_keys(target, src.name, page)
                    missing = {k: v for k, v in state.items.items() if k not in held}
                    refused = refused_by_target(target, src.name, missing)
                    expected = len(state.items) - len(refused)
                    rejected = len(state.rejected) + len(refused)
                try:
                    workers = self.broker.stats(src.name, tgt.name)
                except RetryableError:
                    workers = {}
                rows.append(
                    PairStatus(
                        source=src.name,
                        target=tgt.name,
                        queue=depth,
                        source_revision=revision,
                        source_keys=source_keys,
                        workers=workers,
                        waiting_for_source_canary=waiting,
                        expected_keys=expected,
                        rejected_keys=rejected,
                        **_target_status(source, layout, target),
                    )
                )
        return rows


def verify_once(settings: Settings, examples: int) -> tuple[bool, list[str]]:
    with MeshView(settings) as view:
        return view.verify(examples)


def verify_kvstoremesh_once(settings: Settings, examples: int) -> tuple[bool, list[str]]:
    with MeshView(settings) as view:
        return view.verify_kvstoremesh(examples)


_RFC3339 = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _canary_problems(target: Etcd, source: str) -> list[str]:
    """What differs from KVStoreMesh's synced canaries of *source* in *target*: one per
    resource, an RFC 3339 timestamp, nothing else under the source's synced prefix."""
    want = {canary_key(source, res) for res in RESOURCES if res.canary is not None}
    found = target.items(canary_prefix(source))
    problems = [f"canary missing: {show_key(k)}" for k in sorted(want - set(found))]
    problems += [f"extra key: {show_key(k)}" for k in sorted(set(found) - want)]
    problems += [
        f"canary not an RFC 3339 time: {show_key(k)}"
        for k, v in sorted(found.items())
        if k in want and not _RFC3339.fullmatch(v)
    ]
    return problems


def collect_status(settings: Settings, exact: bool = True) -> list[PairStatus]:
    with MeshView(settings) as view:
        return view.status(exact)


def cached_keys(target: Etcd, source: str, page: int) -> set[bytes]:
    """The keys the target holds of *source* (what read_target reads, without values)."""
    held: set[bytes] = set()
    for res in RESOURCES:
        if res.single_key:
            key = res.cache_prefix(source)
            if target.get(key) is not None:
                held.add(key)
        else:
            held.update(target.keys(res.cache_scan_prefix(source), page))
    return held


def refused_by_target(target: Etcd, source: str, missing: dict[bytes, bytes]) -> dict[bytes, str]:
    """Missing keys that the target refused as too large, with the reason: those a worker
    recorded, whose recorded value is still the source's value."""
    out: dict[bytes, str] = {}
    prefix = rejected_prefix(source)
    records = {key[len(prefix) :]: raw for key, raw in target.items(prefix).items()}
    if not records:
        return out
    for name, value in missing.items():
        # named by the key's SHA-256 (rejected_key), or by the key in base64 (before)
        raw = records.get(rejected_key(source, name)[len(prefix) :])
        if raw is None:
            raw = records.get(base64.urlsafe_b64encode(name))
        if raw is None:
            continue
        record = _record(raw)
        if hashlib.sha256(value).hexdigest() == record.get("sha256"):
            out[name] = show(str(record.get("reason", "refused by the target")))
    return out


def _target_status(source: Etcd, layout: Layout, target: Etcd) -> dict[str, Any]:
    src = layout.source
    pkv = target.get(progress_key(src))
    progress = _record(pkv.value) if pkv else {}
    applied = _number(progress.get("rev"), int) or 0
    stamp = _number(progress.get("ts"), float)
    lag = None
    if pkv:
        # Only revisions that put a synced key count: in a mesh the source etcd is also a
        # target, and kvmesh's own writes there move its revision without anything to sync.
        newest = max(
            source.latest_change(
                res.source_prefix(src, layout.identities), applied, exact=res.single_key
            )
            for res in RESOURCES
        )
        lag = max(0, newest - applied)
    return {
        "applied_revision": applied,
        "lag_revisions": lag,
        "progress_age_s": round(time.time() - stamp, 1) if stamp is not None else None,
        "canaries": len(
            set(target.keys(canary_prefix(src)))
            & {canary_key(src, res) for res in RESOURCES if res.canary}
        ),
        "cached_keys": sum(
            target.count(res.cache_scan_prefix(src)) for res in RESOURCES if not res.single_key
        )
        + (target.get(RESOURCE_BY_NAME["config"].cache_prefix(src)) is not None),
    }


def _record(raw: bytes) -> dict[str, Any]:
    """A kvmesh record read for display: {} when it does not decode."""
    try:
        d = json.loads(raw) if len(raw) <= 4096 else {}
    except (ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def _number(v: Any, kind: type[int] | type[float]) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return kind(v) if abs(v) < 1e15 else None
