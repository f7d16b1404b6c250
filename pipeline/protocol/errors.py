"""Every exception kvmesh raises on purpose, in one tree.

    KvmeshError
    ├── ConfigError             a setting is missing or invalid (names the field)
    ├── BadInputError           one key or message cannot be synced (names the key); the
    │   │                       pipeline counts it and keeps going with everything else
    │   ├── LayoutError         a key does not fit the Cilium layout, or is another cluster's
    │   ├── ValueTooLargeError  a single operation is over the request limit
    │   └── MalformedBatchError a task message does not decode
    │       ├── UnsignedTaskError   it carries no signature
    │       ├── UnknownKeyError     it is signed with a key this worker does not hold
    │       ├── BadSignatureError   its signature does not match its content (tampered)
    │       └── ForbiddenBatchError it touches keys its source may not write
    ├── CorruptRecordError      a kvmesh record in a target does not decode (taken as absent)
    ├── RequestTooLargeError    the target etcd refused a request as too large
    └── RetryableError          a store is unreachable or timed out; try again later
        ├── PublishError        the broker refused a publish (carries how much went out)
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


def show_key(key: bytes, limit: int = 200) -> str:
    """Render a key for a log line: never assumes UTF-8, and escapes every byte that is not
    valid UTF-8 (`\\xff`), every character that is not printable (newlines, escapes, bidi
    controls) and the backslash itself, so a key can neither forge a log line nor pass for
    another key."""
    out = []
    for c in key.decode("utf-8", errors="surrogateescape"):
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


def show(text: str, limit: int = 200) -> str:
    """show_key for text that came from outside (a task ID, a stored reason)."""
    return show_key(text.encode("utf-8", errors="surrogateescape"), limit)


class BadInputError(KvmeshError):
    """One key (or one message) cannot be synced; everything else goes on."""

    kind = "bad_input"

    def __init__(self, key: bytes, reason: str) -> None:
        super().__init__(f"{self.kind}: key {show_key(key)}: {reason}")
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

    kind = "malformed"

    def __init__(self, reason: str) -> None:
        super().__init__(b"<message>", reason)


class UnsignedTaskError(MalformedBatchError):
    """A task without a signature, where signatures are required."""

    kind = "unsigned"


class UnknownKeyError(MalformedBatchError):
    """A task signed with a key the worker does not hold."""

    kind = "unknown_key"


class PayloadGoneError(MalformedBatchError):
    """A task published by reference whose payload is no longer in Redis: it expired, was
    deleted, or its task already ran (a copy delivered twice)."""

    kind = "payload_gone"


class BadSignatureError(MalformedBatchError):
    """A task whose signature does not match its content: it was changed on the way."""

    kind = "bad_signature"


class ForbiddenBatchError(MalformedBatchError):
    """A task that touches keys outside what its source may write in a target."""

    kind = "forbidden"


class CorruptRecordError(KvmeshError):
    """A kvmesh record in a target etcd (generation, fence, progress, resync request) does
    not decode. Whoever reads it takes it as absent: a resync rewrites it."""


class RequestTooLargeError(KvmeshError):
    """etcd refused a request for its size (its --max-request-bytes, or gRPC's limit)."""


class LeaseGoneError(KvmeshError):
    """A put named a lease the target no longer has (it expired, or was revoked): the keys
    on it are gone too, so the pair needs a resync onto a new lease."""


class RetryableError(KvmeshError):
    """A transient failure talking to etcd or Redis. `cluster` names the etcd cluster that
    failed, when it was one."""

    def __init__(self, message: str, cluster: str | None = None) -> None:
        super().__init__(message)
        self.cluster = cluster


class RefusedError(RetryableError):
    """etcd answered and refused the request for something only its operator can change:
    a permission the user's role lacks (PERMISSION_DENIED), fewer operations per
    transaction than kvmesh sends ("too many operations in txn request", a --max-txn-ops
    under sync.max_batch_ops + 1), or the user's login (no such user, a wrong password, a
    token refused again after a new login: usually a user removed, possibly a member that
    has not caught up). Retried like an etcd that does not answer, and counted apart from
    one."""


class PermissionDeniedError(RefusedError):
    """A RefusedError for a range the user's role may not read or write."""


class TimedOutError(RetryableError):
    """etcd did not answer within the call's deadline (DEADLINE_EXCEEDED): down, or cut off
    with its packets dropped; or a login, or a load of a target's lease records, waited
    its deadline out behind another thread's.
    Such a call held its caller for its whole deadline (sync.etcd_timeout, or the
    watcher's loop's shorter one), where other failures come back at once."""


class WatchDeniedError(RetryableError):
    """etcd cancelled a watch for lack of permission: a token that expired (a new one
    cures it) or a role that may not read the range (nothing kvmesh does cures it)."""


class PublishError(RetryableError):
    """The broker refused a publish (unreachable, or out of memory). `published` batches of
    the list went out before it did; the caller keeps the rest."""

    def __init__(self, message: str, published: int) -> None:
        super().__init__(message)
        self.published = published


class QueueFullError(PublishError):
    """A publish stopped at its byte budget: the source's queue holds as much of this
    watcher's tasks as sync.max_queue_bytes allows. `published` batches went out."""


class CompactedError(RetryableError):
    """The revision asked for is older than the store's compaction point."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision
