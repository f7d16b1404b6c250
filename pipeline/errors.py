"""Every exception kvmesh raises on purpose, in one tree.

    KvmeshError
    ├── ConfigError             a setting is missing or invalid (names the field)
    ├── BadInputError           one key or message cannot be synced (names the key); the
    │   │                       pipeline counts it and keeps going with everything else
    │   ├── LayoutError         a key does not fit the Cilium layout, or is another cluster's
    │   ├── ValueTooLargeError  a single operation is over the request limit
    │   └── MalformedBatchError a task message does not decode
    ├── RequestTooLargeError    the target etcd refused a request as too large
    └── RetryableError          a store is unreachable or timed out; try again later
        └── CompactedError      the requested revision was compacted away (carries it)

This module imports nothing of the package.
"""

from __future__ import annotations


class KvmeshError(Exception):
    """Base of every kvmesh error."""


class ConfigError(KvmeshError):
    """A configuration field is missing or invalid."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"config error: {field}: {reason}")
        self.field = field
        self.reason = reason


def _show(key: bytes) -> str:
    """Render a key for a log line without assuming it is UTF-8."""
    text = key.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= 200 else text[:200] + "..."


class BadInputError(KvmeshError):
    """One key (or one message) cannot be synced; everything else goes on."""

    kind = "bad_input"

    def __init__(self, key: bytes, reason: str) -> None:
        super().__init__(f"{self.kind}: key {_show(key)!s}: {reason}")
        self.key = key
        self.reason = reason


class LayoutError(BadInputError):
    """A key under a watched prefix does not fit the layout, or belongs to another cluster."""

    kind = "layout"


class ValueTooLargeError(BadInputError):
    """A single put is larger than the configured request limit."""

    kind = "too_large"


class MalformedBatchError(BadInputError):
    """A task message could not be decoded."""

    kind = "malformed_batch"

    def __init__(self, reason: str) -> None:
        super().__init__(b"<message>", reason)


class RequestTooLargeError(KvmeshError):
    """etcd refused a request for its size (its --max-request-bytes, or gRPC's limit)."""


class RetryableError(KvmeshError):
    """A transient failure talking to etcd or Redis. `cluster` names the etcd cluster that
    failed, when it was one."""

    def __init__(self, message: str, cluster: str | None = None) -> None:
        super().__init__(message)
        self.cluster = cluster


class CompactedError(RetryableError):
    """The revision asked for is older than the store's compaction point."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision
