"""Drain a source that left the config from a target, as KVStoreMesh does when a remote
cluster is removed: its cluster config first, then, after a grace period in which agents see
the cluster go, its synced canaries, every cache prefix of it, and its kvmesh records.

Every watcher runs this now and then for every configured target; the steps are
idempotent, so several watchers doing it at once agree. Each step is one transaction that
compares the records it read: a source added back meanwhile (its watcher opened a
generation and cleared the drain record) is left alone, even by a watcher still running
with the old config.

Watchers whose configs differ run side by side during a rolling update, and one with the
old config would drain a source just added. So no step is taken while a watcher may be
syncing the source (its lease in Redis has a value, or Redis does not answer): a removed
source is drained once its last watcher is gone. A drain that began anyway (the lease was
read just before the source's watcher took it) is ended by that watcher, whose fence poll
sees the drain record and resyncs the target (planner.Cause.DRAINING).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection

from pipeline.clients.etcd import Delete, EtcdClient, ModIs, Put, TxnOp
from pipeline.config import CLUSTER_NAME
from pipeline.protocol.layout import RESOURCES, canary_prefix
from pipeline.protocol.names import draining_key, gen_key, state_prefix

log = logging.getLogger("kvmesh.drain")


def managed_sources(target: EtcdClient) -> set[str]:
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
    target: EtcdClient,
    target_name: str,
    configured: Collection[str],
    grace: float,
    now: float | None = None,
    watched: Callable[[str], bool | None] = lambda _source: False,
) -> list[str]:
    """Advance the drain of every source this target caches that is not *configured* and
    that no watcher may be syncing (*watched* says False: True or None leave it as it is).
    Returns the sources fully drained by this call."""
    now = time.time() if now is None else now
    done = []
    for source in sorted(managed_sources(target) - set(configured) - {target_name}):
        if watched(source) is not False:
            continue
        gen = target.get(gen_key(source))
        gen_rev = gen.mod_revision if gen is not None else 0
        record = target.get(draining_key(source))
        if record is None:
            began = target.txn(
                [ModIs(gen_key(source), gen_rev), ModIs(draining_key(source), 0)],
                [
                    Delete(f"cilium/cluster-config/{source}".encode()),
                    Put(draining_key(source), json.dumps({"since": now}).encode()),
                ],
            )
            if began.succeeded:
                log.warning(
                    "%s: source %s left the config: cluster config deleted, the rest goes in %.0fs",
                    target_name,
                    source,
                    grace,
                )
            continue
        if now - _since(record.value) < grace:
            continue
        ops: list[TxnOp] = [Delete(canary_prefix(source), prefix=True)]
        for res in RESOURCES:
            ops.append(Delete(res.cache_scan_prefix(source), prefix=not res.single_key))
        ops.append(Delete(state_prefix(source), prefix=True))  # the generation record last
        drained = target.txn(
            [ModIs(draining_key(source), record.mod_revision), ModIs(gen_key(source), gen_rev)],
            ops,
        )
        if drained.succeeded:
            log.warning("%s: source %s drained", target_name, source)
            done.append(source)
    return done
