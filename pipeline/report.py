"""Read-only views of a mesh: the per-pair comparison behind `kvmesh verify` and the
per-pair figures behind `kvmesh status` and the lab's live view."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Any

import redis

from .celery_app import redis_client
from .config import READ, WRITE, Settings, queue_name
from .errors import show, show_key
from .etcd import Etcd
from .layout import RESOURCES, Layout, canary_key, progress_key, rejected_prefix
from .publisher import queue_depth
from .snapshot import diff, read_source, read_target


def verify_once(settings: Settings, examples: int) -> tuple[bool, list[str]]:
    lines: list[str] = []
    all_equal = True
    for src in settings.sources:
        targets = settings.targets_of(src.name)
        if not targets:
            continue
        source = Etcd(src, settings.sync.etcd_timeout, READ)
        try:
            state = read_source(
                source,
                settings.layout_of(src),
                page=settings.sync.page_size,
                max_bytes=settings.sync.max_batch_bytes,
            )
        finally:
            source.close()
        for tgt in targets:
            target = Etcd(tgt, settings.sync.etcd_timeout, WRITE)
            try:
                d = diff(state.items, read_target(target, src.name, page=settings.sync.page_size))
                refused = refused_by_target(target, src.name, d.missing)
            finally:
                target.close()
            for key in refused:  # the target refused them (too large): not missing
                del d.missing[key]
            rejected = [reason for _k, reason in sorted(state.rejected.items())]
            rejected += [f"{show_key(k)}: {reason}" for k, reason in sorted(refused.items())]
            head = f"{src.name} -> {tgt.name}:"
            summary = (
                f"{len(state.items)} keys, missing {len(d.missing)}, "
                f"extra {len(d.extra)}, different {len(d.different)}, "
                f"rejected {len(rejected)}"
            )
            lines.append(f"{head} {'EQUAL' if d.equal else 'DIFFERENT'}: {summary}")
            for kind, keys in (
                ("missing", sorted(d.missing)),
                ("extra", d.extra),
                ("different", sorted(d.different)),
            ):
                for key in keys[:examples]:
                    lines.append(f"    {kind}: {show_key(key)}")
            for reason in rejected[:examples]:
                lines.append(f"    rejected: {reason}")
            all_equal = all_equal and d.equal
    return all_equal, lines


def refused_by_target(target: Etcd, source: str, missing: dict[bytes, bytes]) -> dict[bytes, str]:
    """Missing keys that the target refused as too large, with the reason: those a worker
    recorded, whose recorded value is still the source's value."""
    out: dict[bytes, str] = {}
    prefix = rejected_prefix(source)
    for key, raw in target.items(prefix).items():
        try:
            name = base64.urlsafe_b64decode(key[len(prefix) :])
        except (ValueError, binascii.Error):
            continue
        record = _record(raw)
        value = missing.get(name)
        if value is not None and hashlib.sha256(value).hexdigest() == record.get("sha256"):
            out[name] = show(str(record.get("reason", "refused by the target")))
    return out


def collect_status(settings: Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    r = redis_client(settings)
    for src in settings.sources:
        try:
            depth: int | None = queue_depth(r, queue_name(src.name))
        except redis.RedisError:
            depth = None
        source = Etcd(src, settings.sync.etcd_timeout, READ)
        try:
            layout = settings.layout_of(src)
            base = {
                "source": src.name,
                "queue": depth,
                "source_revision": source.revision(),
                "source_keys": sum(
                    source.count(res.source_prefix(src.name, layout.identities))
                    for res in RESOURCES
                    if not res.single_key
                ),
            }
            for tgt in settings.targets_of(src.name):
                target = Etcd(tgt, settings.sync.etcd_timeout, WRITE)
                try:
                    row = {**base, "target": tgt.name, **_target_status(source, layout, target)}
                finally:
                    target.close()
                try:
                    stats = r.hgetall(f"kvmesh:stats:{src.name}:{tgt.name}")
                    row["workers"] = {
                        _text(k): int(v) for k, v in stats.items() if v.isdigit() and len(v) < 19
                    }
                except redis.RedisError:
                    row["workers"] = {}
                rows.append(row)
        finally:
            source.close()
    return rows


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
        "canaries": sum(
            1 for res in RESOURCES if res.canary and target.get(canary_key(src, res)) is not None
        ),
        "cached_keys": sum(
            target.count(res.cache_scan_prefix(src)) for res in RESOURCES if not res.single_key
        ),
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


def _text(v: bytes | str) -> str:
    return show_key(v if isinstance(v, bytes) else v.encode(), 64)
