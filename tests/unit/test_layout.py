"""Key rewrite and filtering against Cilium's layout."""

from __future__ import annotations

import json

import pytest

from pipeline.protocol.errors import LayoutError
from pipeline.protocol.layout import RESOURCE_BY_NAME, RESOURCES, Layout, canary_key

A = Layout("cluster-a", 1)


@pytest.mark.parametrize(
    ("resource", "source_key", "target_key"),
    [
        (
            "nodes",
            b"cilium/state/nodes/v1/cluster-a/node-1",
            b"cilium/cache/nodes/v1/cluster-a/node-1",
        ),
        (
            "services",
            b"cilium/state/services/v1/cluster-a/default/foo",
            b"cilium/cache/services/v1/cluster-a/default/foo",
        ),
        (
            "serviceexports",
            b"cilium/state/serviceexports/v1/cluster-a/ns/exp",
            b"cilium/cache/serviceexports/v1/cluster-a/ns/exp",
        ),
        (
            "ipcache",
            b"cilium/state/ip/v1/default/10.244.1.79",
            b"cilium/cache/ip/v1/cluster-a/10.244.1.79",
        ),
        (
            "identities",
            b"cilium/state/identities/v1/id/65792",
            b"cilium/cache/identities/v1/cluster-a/id/65792",
        ),
        ("config", b"cilium/cluster-config/cluster-a", b"cilium/cluster-config/cluster-a"),
    ],
)
def test_rewrite_matches_cilium_cache_layout(
    resource: str, source_key: bytes, target_key: bytes
) -> None:
    """Each resource's source key lands at the cache path Cilium agents read."""
    assert A.rewrite(RESOURCE_BY_NAME[resource], source_key) == target_key


def test_identity_value_keys_are_not_even_watched_by_default() -> None:
    """In the default mode the identities watch covers only the id/ subtree."""
    res = RESOURCE_BY_NAME["identities"]
    prefix = res.source_prefix("cluster-a")
    assert prefix == b"cilium/state/identities/v1/id/"
    value_key = b"cilium/state/identities/v1/value/k8s:app=x;/172.0.0.1"
    assert not value_key.startswith(prefix)
    with pytest.raises(LayoutError, match="outside the watched prefix"):
        A.rewrite(res, value_key)


def test_identities_all_mode_copies_value_keys() -> None:
    """identities = "all" restores the pre-fix behaviour for comparison."""
    layout = Layout("cluster-a", 1, "all")
    res = RESOURCE_BY_NAME["identities"]
    assert res.source_prefix("cluster-a", "all") == b"cilium/state/identities/v1/"
    key = b"cilium/state/identities/v1/value/k8s:app=x;/172.0.0.1"
    assert (
        layout.rewrite(res, key)
        == b"cilium/cache/identities/v1/cluster-a/value/k8s:app=x;/172.0.0.1"
    )


def test_identity_of_another_cluster_is_rejected() -> None:
    """An identity scoped to another cluster ID, or to none, is not this cluster's key."""
    res = RESOURCE_BY_NAME["identities"]
    other = str((2 << 16) | 300).encode()
    with pytest.raises(LayoutError, match="cluster ID 2"):
        A.rewrite(res, b"cilium/state/identities/v1/id/" + other)
    with pytest.raises(LayoutError, match="cluster ID 0"):
        A.rewrite(res, b"cilium/state/identities/v1/id/300")
    assert A.rewrite(res, b"cilium/state/identities/v1/id/" + str((1 << 16) | 5).encode())


def test_identity_scope_follows_max_connected_clusters() -> None:
    """With maxConnectedClusters 511 the cluster ID takes 9 bits, shifted by 15."""
    res = RESOURCE_BY_NAME["identities"]
    wide = Layout("cluster-a", 300, max_connected_clusters=511)
    assert wide.rewrite(res, b"cilium/state/identities/v1/id/" + str(300 << 15).encode())
    with pytest.raises(LayoutError):
        wide.rewrite(res, b"cilium/state/identities/v1/id/" + str(300 << 16).encode())


@pytest.mark.parametrize(
    "suffix", [b"abc", b"12x", b"", b"\xff\xfe", b"99999999999", b"0000065537", b"+65537"]
)
def test_malformed_identity_ids_are_rejected(suffix: bytes) -> None:
    """An identity key whose ID is not a canonical decimal number is bad input, named in the
    error: `0000065537` and `65537` would otherwise be two keys for one identity."""
    key = b"cilium/state/identities/v1/id/" + suffix
    with pytest.raises(LayoutError) as err:
        A.rewrite(RESOURCE_BY_NAME["identities"], key)
    assert err.value.key == key


def test_non_utf8_keys_are_rewritten_byte_exactly() -> None:
    """etcd keys are bytes: a node name that is not UTF-8 survives the rewrite unchanged."""
    key = b"cilium/state/nodes/v1/cluster-a/\xff\x00node"
    assert (
        A.rewrite(RESOURCE_BY_NAME["nodes"], key) == b"cilium/cache/nodes/v1/cluster-a/\xff\x00node"
    )


def test_other_clusters_prefixes_do_not_match() -> None:
    """Another cluster's nodes under the source etcd are outside the watched prefix."""
    with pytest.raises(LayoutError):
        A.rewrite(RESOURCE_BY_NAME["nodes"], b"cilium/state/nodes/v1/cluster-b/node-1")
    with pytest.raises(LayoutError):
        A.rewrite(RESOURCE_BY_NAME["config"], b"cilium/cluster-config/cluster-b")


def test_cluster_config_is_marked_cached() -> None:
    """The cluster config is copied with capabilities.cached = true, as KVStoreMesh does, in
    the bytes Cilium's Go struct encodes to (measured from KVStoreMesh in the same run)."""
    src = json.dumps({"capabilities": {"maxConnectedClusters": 255}, "id": 1}).encode()
    out = A.transform_value(RESOURCE_BY_NAME["config"], b"k", src)
    assert out == (
        b'{"id":1,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}'
    )


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        # absent and empty fields are left out, as omitempty does; a false pointer is kept
        (
            {"serviceExportsEnabled": False},
            b'"maxConnectedClusters":255,"serviceExportsEnabled":false',
        ),
        ({"serviceExportsEnabled": None}, b'"maxConnectedClusters":255'),
        (
            {"endpointSlicesExportMode": "EndpointSlicesOnly", "serviceExportsEnabled": True},
            b'"maxConnectedClusters":255,"serviceExportsEnabled":true,'
            b'"endpointSlicesExportMode":"EndpointSlicesOnly"',
        ),
        # fields kvmesh does not know are kept, after the known ones, in source order
        ({"zeta": 1, "alpha": [1]}, b'"maxConnectedClusters":255,"zeta":1,"alpha":[1]'),
    ],
)
def test_cluster_config_keeps_gos_field_order(caps: dict[str, object], expected: bytes) -> None:
    src = json.dumps(
        {"extra": {"x": 1}, "capabilities": {**caps, "maxConnectedClusters": 255}, "id": 1}
    )
    out = A.transform_value(RESOURCE_BY_NAME["config"], b"k", src.encode())
    assert out == (
        b'{"id":1,"capabilities":{"syncedCanaries":true,"cached":true,' + expected + b"},"
        b'"extra":{"x":1}}'
    )


def test_cluster_config_with_a_mistyped_capability_is_rejected() -> None:
    src = b'{"id":1,"capabilities":{"maxConnectedClusters":"255"}}'
    with pytest.raises(LayoutError, match="maxConnectedClusters is not a number"):
        A.transform_value(RESOURCE_BY_NAME["config"], b"k", src)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b"\xff", "not JSON"),
        (b'{"id": 1, "capabilities": 3}', "capabilities"),
        (b'{"id": 2}', "not the configured 1"),
        (b'{"id": true}', "not the configured 1"),
        (b'{"capabilities": {}}', "not the configured 1"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b'{"id": 1, "x": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"id": 1, "x": NaN}', "NaN"),
        (b'{"id": 1, "x": -Infinity}', "Infinity"),
        (b'{"id": 1, "x": "' + b"y" * 70_000 + b'"}', "limit"),
        (b'{"id": 1e0}', "not the configured 1"),
        (b'{"id": 1, "x": 1e999}', "finite"),
        (b'{"id": 1, "capabilities": {"maxConnectedClusters": 511}}', "maxConnectedClusters"),
        # Go reads field names regardless of case (and folds \u017f and \u212a as s and k)
        (b'{"id": 1, "ID": 7}', "field ID is id but for case"),
        (b'{"id": 1, "Capabilities": {}}', "field Capabilities is capabilities"),
        (b'{"id": 1, "capabilities": {"Cached": false}}', "capabilities.Cached is"),
        (b'{"id": 1, "capabilities": {"MAXCONNECTEDCLUSTERS": 511}}', "capabilities.MAX"),
        (b'{"id": 1, "capabilities": {"\xc5\xbfyncedCanaries": false}}', "but for case"),
    ],
)
def test_hostile_cluster_config_is_rejected(value: bytes, reason: str) -> None:
    """A cluster config that is not a bounded JSON object with the configured ID is bad
    input, reported with its key and the reason, never an exception of another kind."""
    with pytest.raises(LayoutError, match=reason) as err:
        A.transform_value(RESOURCE_BY_NAME["config"], b"cilium/cluster-config/cluster-a", value)
    assert err.value.key == b"cilium/cluster-config/cluster-a"


def test_other_values_pass_through_untouched() -> None:
    """Values of every other resource are copied byte for byte, empty ones included."""
    for res in RESOURCES:
        if res.name != "config":
            assert A.transform_value(res, b"k", b"\x00\xffraw") == b"\x00\xffraw"
            assert A.transform_value(res, b"k", b"") == b""


def test_canary_keys() -> None:
    """Synced canaries use Cilium's path per resource."""
    assert canary_key("cluster-a", RESOURCE_BY_NAME["identities"]) == (
        b"cilium/synced/cluster-a/cilium/cache/identities/v1"
    )
    assert canary_key("cluster-a", RESOURCE_BY_NAME["ipcache"]) == (
        b"cilium/synced/cluster-a/cilium/cache/ip/v1"
    )
