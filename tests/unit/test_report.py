"""What `kvmesh verify` and `status` read from a target besides the cached keys."""

from __future__ import annotations

import base64
import hashlib
import json

from pipeline.protocol.names import rejected_key, rejected_prefix
from pipeline.tools.report import refused_by_target
from tests.memory_etcd import MemoryEtcd


def test_verify_finds_a_refusal_under_either_name() -> None:
    """`kvmesh verify` reads the records of refused keys named by the key's SHA-256 (since
    2026-11-30) and those named by the key in base64 (before), and counts a key as refused
    only while its record holds the value the source still has."""

    def record(value: bytes) -> bytes:
        return json.dumps(
            {"reason": "too big", "sha256": hashlib.sha256(value).hexdigest()}
        ).encode()

    target = MemoryEtcd("b")
    new, old, other = (f"cilium/cache/nodes/v1/a/n{i}".encode() for i in range(3))
    target.put(rejected_key("a", new), record(b"v1"))
    target.put(rejected_prefix("a") + base64.urlsafe_b64encode(old), record(b"v2"))
    missing = {new: b"v1", old: b"v2", other: b"v3"}
    assert set(refused_by_target(target, "a", missing)) == {new, old}  # type: ignore[arg-type]
    assert refused_by_target(target, "a", {new: b"changed"}) == {}  # type: ignore[arg-type]
    assert len(rejected_key("a", b"k" * 100_000)) == len(rejected_key("a", b"k"))
