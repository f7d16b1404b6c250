"""Cilium's clustermesh key layout: what is read from a source and where it lands in a target.

WARNING - STABLE API. Cilium agents read the cache paths below byte for byte; the fence keys
are read by every kvmesh version in a mesh. Change nothing here without a migration.

Pure code: no sockets. Keys and values are bytes and are never decoded as text, except the
cluster config value (JSON by definition) and identity IDs (decimal by definition).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.protocol.errors import LayoutError, show_key


class Op(StrEnum):
    PUT = "p"
    DELETE = "d"


@dataclass(frozen=True)
class Resource:
    """One synced resource: a watched source prefix and its cache prefix in the target."""

    name: str  # stable short name, used in fence keys and metrics labels
    canary: str | None  # `cilium/cache/<canary>/v1` resource in the synced canary, if any
    single_key: bool = False  # the cluster config is one key, not a prefix

    @property
    def scope(self) -> str:
        """The `scope` label of KVStoreMesh's metrics: `nodes/v1`, `ip/v1`, ..."""
        return f"{self.canary}/v1" if self.canary else "cluster-config"

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


def parse_shard(shard: str) -> tuple[Resource, int] | None:
    """`<resource>-<n>` to (resource, n), or None if the name is not one kvmesh makes."""
    name, sep, index = shard.rpartition("-")
    res = RESOURCE_BY_NAME.get(name)
    if (
        not sep
        or res is None
        or not (index.isascii() and index.isdigit())
        or (index[0] == "0" and index != "0")
    ):
        return None
    n = int(index)
    if res.single_key and n != 0:
        return None
    return res, n


def may_write(source: str, resource: Resource, key: bytes) -> bool:
    """Whether a batch of *source*, in a shard of *resource*, may touch *key* in a target:
    only that source's cache of that resource (for identities the whole per-cluster subtree,
    so that value keys of an older `identities = "all"` run can be deleted), or its cluster
    config. Never another source's keys, the target's own state, or kvmesh's records."""
    prefix = resource.cache_scan_prefix(source)
    if resource.single_key:
        return key == prefix
    return key.startswith(prefix) and len(key) > len(prefix)


# ---------------------------------------------------------------------------------------------
# filtering and rewriting


CLUSTER_ID_SHIFT = 16  # identity IDs are scoped as (cluster ID << 16) | local ID


def cluster_id_shift(max_connected_clusters: int) -> int:
    """Identity IDs have 24 bits: the cluster ID takes the top 8 (255 clusters, the
    default) or 9 (maxConnectedClusters = 511), so it is shifted by 16 or by 15."""
    return 15 if max_connected_clusters == 511 else 16


@dataclass(frozen=True)
class Layout:
    """The rewrite rules for one source cluster."""

    source: str
    cluster_id: int
    identities: str = "id"
    max_connected_clusters: int = 255  # the mesh's setting: 255, or 511 (Cilium's extended)

    @property
    def id_shift(self) -> int:
        return cluster_id_shift(self.max_connected_clusters)

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
        # canonical decimal: one spelling per ID, so `0000065537` and `65537` cannot both
        # be cached under two keys
        if not suffix.isdigit() or len(suffix) > 10 or (suffix[:1] == b"0" and suffix != b"0"):
            raise LayoutError(key, "identity ID is not a canonical decimal number")
        scope = int(suffix) >> self.id_shift
        # The cluster bits must be this source's own cluster ID, or the key is another
        # cluster's (or carries no cluster scope at all).
        if scope != self.cluster_id:
            raise LayoutError(key, f"identity belongs to cluster ID {scope}, not {self.cluster_id}")

    def transform_value(self, resource: Resource, key: bytes, value: bytes) -> bytes:
        """The value written to the target; only the cluster config is changed."""
        if resource.name != "config":
            return value
        return cached_cluster_config(key, value, self.cluster_id, self.max_connected_clusters)


MAX_CLUSTER_CONFIG = 64 * 1024  # bytes; Cilium's is about 100
# A cached copy is written with every character outside printable ASCII escaped (\uXXXX:
# six bytes for a byte of DEL, or for two of a Latin letter), and with the two capabilities
# kvmesh adds, so the copy of a config within the limit may be up to six times as long and
# a little more: read back with this limit, it is still the config it was (a copy refused
# for its size would leave a watcher that starts on an empty source believing there never
# was one)
MAX_CACHED_CLUSTER_CONFIG = 6 * MAX_CLUSTER_CONFIG + 1024
_MAX_DIGITS = 20  # any number in a cluster config fits a uint64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)


def parse_cluster_config(
    key: bytes,
    value: bytes,
    cluster_id: int,
    max_connected: int = 255,
    limit: int = MAX_CLUSTER_CONFIG,
) -> dict[str, Any]:
    """A source's cluster config, parsed as untrusted input: a JSON object of bounded size,
    with no NaN or Infinity, no number longer than a uint64, nesting Python can parse, an
    `id` equal to the configured cluster ID, and the mesh's maxConnectedClusters (Cilium's
    agents refuse a remote cluster that disagrees). Raises LayoutError with the reason."""
    if len(value) > limit:
        raise LayoutError(key, f"cluster config of {len(value)} bytes (limit {limit})")
    try:
        cfg = json.loads(
            value,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise LayoutError(key, "cluster config is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise LayoutError(key, f"cluster config is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise LayoutError(key, "cluster config is not a JSON object")
    cid = cfg.get("id")
    if type(cid) is not int or cid != cluster_id:
        shown = repr(cid)[:40]
        raise LayoutError(key, f"cluster config id is {shown}, not the configured {cluster_id}")
    caps = cfg.get("capabilities")
    if caps is not None and not isinstance(caps, dict):
        raise LayoutError(key, "cluster config capabilities is not a JSON object")
    _one_spelling(key, cfg, _CONFIG_FIELDS, "")
    if caps is not None:
        _one_spelling(key, caps, [name for name, _ in _CAPABILITY_FIELDS], "capabilities.")
    advertised = max_connected_clusters(cfg)
    if advertised != max_connected:
        raise LayoutError(
            key,
            f"cluster config says maxConnectedClusters {advertised}, the mesh {max_connected}",
        )
    return cfg


def _one_spelling(key: bytes, obj: dict[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse a field spelled like a known one but for case ("ID", "Cached"): Cilium's
    agents (Go's encoding/json) read field names regardless of case, the last one winning,
    so `{"id":1,"ID":7}` would pass the check of the ID above and reach them as 7, and a
    "Cached": false after the cached mark kvmesh writes would undo it."""
    folded = {name.casefold(): name for name in known}
    for name in obj:
        same = folded.get(name.casefold())
        if same is not None and name != same:
            raise LayoutError(
                key,
                f"cluster config field {where}{show_key(name.encode(), 64)} is "
                f"{where}{same} but for case, which Cilium would read as that",
            )


def max_connected_clusters(cfg: dict[str, Any]) -> int:
    """What a cluster config advertises; absent or 0 means Cilium's default, 255."""
    caps = cfg.get("capabilities") or {}
    value = caps.get("maxConnectedClusters")
    if type(value) is not int or value == 0:
        return 255
    return value


# Cilium's CiliumClusterConfig, in the order of its Go struct: encoding/json writes fields in
# that order and leaves out the empty ones (omitempty): a zero id, false booleans, a zero
# number. serviceExportsEnabled is a pointer there, so false is written and only absence is
# left out. The capabilities object itself is a struct, which omitempty never leaves out.
_CONFIG_FIELDS = ("id", "capabilities")
_CAPABILITY_FIELDS: tuple[tuple[str, type], ...] = (
    ("syncedCanaries", bool),
    ("cached", bool),
    ("maxConnectedClusters", int),
    ("serviceExportsEnabled", bool),
    ("endpointSlicesExportMode", str),
)
_KEEP_FALSE = {"serviceExportsEnabled"}


def _go_order(key: bytes, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as Go would write it: known fields first, in struct order, empty ones
    left out; fields kvmesh does not know are kept after them, in their source order (Go
    would drop them; keeping them lets a newer source's capabilities reach its agents)."""
    caps_in = cfg.get("capabilities") or {}
    caps: dict[str, Any] = {}
    for name, kind in _CAPABILITY_FIELDS:
        if name not in caps_in or caps_in[name] is None:
            continue
        value = caps_in[name]
        if type(value) is not kind:
            shown = {bool: "boolean", int: "number", str: "string"}[kind]
            raise LayoutError(key, f"cluster config capabilities.{name} is not a {shown}")
        if value or name in _KEEP_FALSE:
            caps[name] = value
    known = {name for name, _ in _CAPABILITY_FIELDS}
    caps.update((k, v) for k, v in caps_in.items() if k not in known)
    out: dict[str, Any] = {}
    if cfg.get("id"):
        out["id"] = cfg["id"]
    out["capabilities"] = caps
    out.update((k, v) for k, v in cfg.items() if k not in _CONFIG_FIELDS)
    return out


def cached_cluster_config(
    key: bytes, value: bytes, cluster_id: int, max_connected: int = 255
) -> bytes:
    """Copy a cluster config and mark it as cached, as Cilium's KVStoreMesh does: the
    capabilities gain `"syncedCanaries": true` (kvmesh writes canaries) and `"cached": true`,
    and the bytes are what Cilium's Go struct encodes to (compact, its field order)."""
    cfg = parse_cluster_config(key, value, cluster_id, max_connected)
    caps = dict(cfg.get("capabilities") or {})
    caps["syncedCanaries"] = True
    caps["cached"] = True
    cfg["capabilities"] = caps
    return json.dumps(_go_order(key, cfg), separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------
# what a source advertises


@dataclass(frozen=True)
class SourceCaps:
    """What a source's cluster config says about what to sync from it, as Cilium reads it:

    - synced_canaries: the source writes `cilium/synced/<c>/cilium/state/<res>/v1` once it
      has written all of a resource; until then a resource may be incomplete (a source
      rebuilding after a restart), so nothing of it is deleted from a cache;
    - service_exports: `serviceExportsEnabled` is present (true or false); without it the
      source does not support MCS-API ServiceExports and none are synced;
    - services: false with `endpointSlicesExportMode: EndpointSlicesOnly`.

    A resource that is not synced is drained from the caches, and its canary is written.
    """

    synced_canaries: bool = False
    service_exports: bool = False
    services: bool = True

    def syncs(self, resource: Resource) -> bool:
        if resource.name == "serviceexports":
            return self.service_exports
        if resource.name == "services":
            return self.services
        return True


def source_caps(cfg: dict[str, Any] | None) -> SourceCaps:
    """The capabilities of a parsed cluster config; None (no config) advertises nothing."""
    if cfg is None:
        return SourceCaps()
    caps = cfg.get("capabilities") or {}
    return SourceCaps(
        synced_canaries=caps.get("syncedCanaries") is True,
        service_exports=isinstance(caps.get("serviceExportsEnabled"), bool),
        services=caps.get("endpointSlicesExportMode") != "EndpointSlicesOnly",
    )


def source_canary_key(source: str, resource: Resource) -> bytes:
    """`cilium/synced/<c>/cilium/state/<resource>/v1`: the source wrote all of a resource."""
    assert resource.canary is not None
    return f"cilium/synced/{source}/cilium/state/{resource.canary}/v1".encode()
