"""Drain a source that left the config from a target, as KVStoreMesh does when a remote
cluster is removed: its cluster config first, then, after a grace period in which agents see
the cluster go, its synced canaries, every cache prefix of it, and last its kvmesh records.

Every watcher runs this for its targets now and then; the steps are idempotent, so several
watchers doing it at once agree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection

from .config import CLUSTER_NAME
from .etcd import Etcd
from .layout import RESOURCES, canary_prefix, draining_key, state_prefix

log = logging.getLogger("kvmesh.drain")


def managed_sources(target: Etcd) -> set[str]:
    """Sources that kvmesh has synced into this target (they have a generation record)."""
    names = set()
    for key in target.keys(b"kvmesh/"):
        parts = key.split(b"/")
        if len(parts) == 3 and parts[2] in (b"gen", b"draining"):
            name = parts[1].decode("ascii", errors="replace")
            if CLUSTER_NAME.match(name):  # anything else is no cluster kvmesh ever synced
                names.add(name)
    return names


def _since(raw: bytes) -> float:
    """When a drain began, from its record; 0 (drain now) for one that does not decode."""
    try:
        since = json.loads(raw)["since"] if len(raw) <= 4096 else 0.0
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return 0.0
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        return 0.0
    return float(since)


def drain_removed(
    target: Etcd,
    target_name: str,
    configured: Collection[str],
    grace: float,
    now: float | None = None,
) -> list[str]:
    """Advance the drain of every source this target caches that is not *configured*.
    Returns the sources fully drained by this call."""
    now = time.time() if now is None else now
    done = []
    for source in sorted(managed_sources(target) - set(configured) - {target_name}):
        record = target.get(draining_key(source))
        if record is None:
            target.delete(f"cilium/cluster-config/{source}".encode())
            target.put(draining_key(source), json.dumps({"since": now}).encode())
            log.warning(
                "%s: source %s left the config: cluster config deleted, the rest goes in %.0fs",
                target_name,
                source,
                grace,
            )
            continue
        since = _since(record.value)
        if now - since < grace:
            continue
        target.delete_prefix(canary_prefix(source))
        for res in RESOURCES:
            if res.single_key:
                target.delete(res.cache_scan_prefix(source))
            else:
                target.delete_prefix(res.cache_scan_prefix(source))
        target.delete_prefix(state_prefix(source))  # the generation record goes last
        log.warning("%s: source %s drained", target_name, source)
        done.append(source)
    return done
