"""Cilium's clustermesh key layout: what is read from a source and where it lands in a target.

WARNING - STABLE API. Cilium agents read the cache paths below byte for byte; the fence keys
are read by every kvmesh version in a mesh. Change nothing here without a migration.

Pure code: no sockets. Keys and values are bytes and are never decoded as text, except the
cluster config value (JSON by definition) and identity IDs (decimal by definition).
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from enum import StrEnum

from .errors import LayoutError


class Op(StrEnum):
    PUT = "p"
    DELETE = "d"


@dataclass(frozen=True)
class Resource:
    """One synced resource: a watched source prefix and its cache prefix in the target."""

    name: str  # stable short name, used in fence keys and metrics labels
    canary: str | None  # `cilium/cache/<canary>/v1` resource in the synced canary, if any
    single_key: bool = False  # the cluster config is one key, not a prefix

    def source_prefix(self, cluster: str, identities: str = "id") -> bytes:
        return _prefix("source", self.name, cluster, identities)

    def cache_prefix(self, cluster: str, identities: str = "id") -> bytes:
        return _prefix("cache", self.name, cluster, identities)

    def cache_scan_prefix(self, cluster: str) -> bytes:
        """What the target may hold for this resource: for identities the whole per-cluster
        subtree, so that value keys left by an older `identities = "all"` run are cleaned."""
        return _prefix("scan", self.name, cluster, "all")


@functools.cache
def _prefix(kind: str, resource: str, cluster: str, identities: str) -> bytes:
    """Prefixes are built once per (kind, resource, cluster, mode): they sit on hot paths."""
    if kind == "source":
        if resource == "identities" and identities == "all":
            return b"cilium/state/identities/v1/"
        return _SOURCE[resource].format(c=cluster).encode()
    if kind == "cache" and resource == "identities" and identities == "id":
        return f"cilium/cache/identities/v1/{cluster}/id/".encode()
    return _CACHE[resource].format(c=cluster).encode()


_SOURCE = {
    "nodes": "cilium/state/nodes/v1/{c}/",
    "services": "cilium/state/services/v1/{c}/",
    "serviceexports": "cilium/state/serviceexports/v1/{c}/",
    "ipcache": "cilium/state/ip/v1/default/",
    "identities": "cilium/state/identities/v1/id/",
    "config": "cilium/cluster-config/{c}",
}
_CACHE = {
    "nodes": "cilium/cache/nodes/v1/{c}/",
    "services": "cilium/cache/services/v1/{c}/",
    "serviceexports": "cilium/cache/serviceexports/v1/{c}/",
    "ipcache": "cilium/cache/ip/v1/{c}/",
    "identities": "cilium/cache/identities/v1/{c}/",
    "config": "cilium/cluster-config/{c}",
}

RESOURCES: tuple[Resource, ...] = (
    Resource("nodes", "nodes"),
    Resource("services", "services"),
    Resource("serviceexports", "serviceexports"),
    Resource("ipcache", "ip"),
    Resource("identities", "identities"),
    Resource("config", None, single_key=True),
)
RESOURCE_BY_NAME = {r.name: r for r in RESOURCES}


def canary_key(source: str, resource: Resource) -> bytes:
    """`cilium/synced/<c>/cilium/cache/<resource>/v1`: written once the initial sync landed."""
    assert resource.canary is not None
    return f"cilium/synced/{source}/cilium/cache/{resource.canary}/v1".encode()


def canary_prefix(source: str) -> bytes:
    return f"cilium/synced/{source}/".encode()


# kvmesh's own bookkeeping in each target etcd, outside `cilium/` so agents never see it.
def state_prefix(source: str) -> bytes:
    return f"kvmesh/{source}/".encode()


def gen_key(source: str) -> bytes:
    return f"kvmesh/{source}/gen".encode()


def fence_key(source: str, shard: str) -> bytes:
    return f"kvmesh/{source}/fence/{shard}".encode()


def progress_key(source: str) -> bytes:
    return f"kvmesh/{source}/progress".encode()


def rejected_prefix(source: str) -> bytes:
    """Records of keys a target refused (too large), read by `kvmesh verify`."""
    return f"kvmesh/{source}/rejected/".encode()


def rejected_key(source: str, key: bytes) -> bytes:
    return rejected_prefix(source) + base64.urlsafe_b64encode(key)


def draining_key(source: str) -> bytes:
    """Set in a target while a source that left the config is being drained from it."""
    return f"kvmesh/{source}/draining".encode()


def resync_key(source: str) -> bytes:
    return f"kvmesh/{source}/resync".encode()


# ---------------------------------------------------------------------------------------------
# filtering and rewriting


CLUSTER_ID_SHIFT = 16  # identity IDs are scoped as (cluster ID << 16) | local ID


@dataclass(frozen=True)
class Layout:
    """The rewrite rules for one source cluster."""

    source: str
    cluster_id: int
    identities: str = "id"

    def rewrite(self, resource: Resource, key: bytes) -> bytes:
        """Map a source key to its target key, or raise LayoutError naming the reason.

        The target key is the cache prefix plus the source key minus the watched prefix.
        """
        src = resource.source_prefix(self.source, self.identities)
        if resource.single_key:
            if key != src:
                raise LayoutError(key, f"not the cluster config key {src.decode()}")
            return resource.cache_prefix(self.source, self.identities)
        if not key.startswith(src):
            raise LayoutError(key, f"outside the watched prefix {src.decode()}")
        suffix = key[len(src) :]
        if not suffix:
            raise LayoutError(key, "empty key suffix under a watched prefix")
        if resource.name == "identities":
            self._check_identity(key, suffix)
        return resource.cache_prefix(self.source, self.identities) + suffix

    def _check_identity(self, key: bytes, suffix: bytes) -> None:
        if self.identities == "all":
            if suffix.startswith(b"value/"):
                return
            if not suffix.startswith(b"id/"):
                raise LayoutError(key, "identity key neither under id/ nor value/")
            suffix = suffix[3:]
        if not suffix.isdigit() or len(suffix) > 10:
            raise LayoutError(key, "identity ID is not a decimal number")
        scope = int(suffix) >> CLUSTER_ID_SHIFT
        # Scope 0 means the ID carries no cluster scope (a cluster without an ID); any other
        # scope must be this source's own cluster ID, or the key is another cluster's.
        if scope not in (0, self.cluster_id):
            raise LayoutError(key, f"identity belongs to cluster ID {scope}, not {self.cluster_id}")

    def transform_value(self, resource: Resource, key: bytes, value: bytes) -> bytes:
        """The value written to the target; only the cluster config is changed."""
        if resource.name != "config":
            return value
        return cached_cluster_config(key, value)


def cached_cluster_config(key: bytes, value: bytes) -> bytes:
    """Copy a cluster config and mark it as cached, as Cilium's KVStoreMesh does: the
    capabilities gain `"syncedCanaries": true` (kvmesh writes canaries) and `"cached": true`."""
    try:
        cfg = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(key, f"cluster config is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise LayoutError(key, "cluster config is not a JSON object")
    caps = cfg.get("capabilities")
    if caps is None:
        caps = {}
    if not isinstance(caps, dict):
        raise LayoutError(key, "cluster config capabilities is not a JSON object")
    caps = dict(caps)
    caps["syncedCanaries"] = True
    caps["cached"] = True
    cfg["capabilities"] = caps
    return json.dumps(cfg, separators=(",", ":")).encode()
