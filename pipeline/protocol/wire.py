"""The task payload: a few batches of operations for one target, each batch for one
(source, target, shard) and applied in its own transaction, signed by the watcher.

WARNING - STABLE API: watchers and workers of different versions share queues. The payload is
plain JSON (Celery's JSON serializer; pickle is never accepted) with a schema version `v`.
Keys and values are base64, so bytes that are not UTF-8 travel exactly.

    {"v": 2, "batches": [
        {"source": "cluster-a", "target": "cluster-b", "shard": "identities-3",
         "gen": 4, "prev": [1200, 0], "pos": [1310, 2], "done": true,
         "t": 1764300000000,                        (optional, ms: the oldest event's time)
         "ops": [["p", "<b64 key>", "<b64 value>"], ["d", "<b64 key>", null]]},
        ...],
     "gap_since": 1764300000000,                    (optional, ms: set on a gap retry)
     "sig": {"kid": "<key id>", "hmac": "<hex>"}}

`sig.hmac` is HMAC-SHA256, under the key named by `sig.kid`, of the canonical bytes of the
payload without `sig`: JSON with sorted keys, no spaces, ASCII only. Redis and Flower are
transport, not authority: a worker verifies the signature before anything else, and a task
that anyone could have written or changed on the way is dropped. A payload read from Redis
by reference in the watcher's own spelling (the canonical bytes with `sig` appended as the
last member, Signer.signed_json, the only spelling watchers write there) is verified over
its bytes as they came, before it is parsed; any other text there is refused unparsed (a
Redis writer could otherwise make every worker parse up to 128 MiB of JSON, at many times
that in memory, for nothing). Replaying a genuine task is
harmless: the fence makes it a duplicate or obsolete.

Several batches travel in one task because Celery's per-task cost, not etcd, bounds a
worker's throughput; each batch still has its own fence decision.

A task's one argument is this payload, or, for a payload over CLAIM_CHECK_BYTES,
`{"ref": "kvmesh:payload:<32 hex digits>"}`: the name of a Redis string holding the payload's
JSON text (names.payload_key; the worker reads it, verifies it as above, and deletes it).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import chain
from typing import Any, NamedTuple, cast

from pipeline.protocol.errors import (
    BadSignatureError,
    MalformedBatchError,
    UnknownKeyError,
    UnsignedTaskError,
)
from pipeline.protocol.fence import Position
from pipeline.protocol.layout import Op

SCHEMA_VERSION = 3  # what watchers write
# What workers read. Schema 3 adds the task's shared operation lists ("ops"); a schema 2
# task (every batch's ops inline) is a schema 3 task without them.
READ_VERSIONS = (2, 3)


class Operation(NamedTuple):
    """One put or delete. A named tuple: a task makes one per key, and a tuple is made in
    half the time of a frozen dataclass."""

    op: Op
    key: bytes
    # None for a delete, and only for one: a put's value is bytes, if empty (what a worker
    # writes is decided by it: Writes deletes a key whose value is None)
    value: bytes | None = None

    @property
    def size(self) -> int:
        return op_size(self.key, self.value)


# An Operation made as a tuple is, without the Python call of a named tuple's constructor:
# new_operation((op, key, value)), in about half the time, where one is made per key (a
# worker decoding a task, a watcher cutting a snapshot)
new_operation = cast(
    Callable[[tuple[Op, bytes, bytes | None]], Operation], partial(tuple.__new__, Operation)
)


def op_size(key: bytes, value: bytes | None) -> int:
    """Bytes one operation adds to an etcd request (key, value and framing)."""
    return len(key) + (len(value) if value is not None else 0) + 16


@dataclass(frozen=True)
class Batch:
    source: str
    target: str
    shard: str
    gen: int
    prev: Position
    pos: Position
    ops: tuple[Operation, ...]
    done: bool = True  # false while the shard is inside a snapshot (see fence.py)
    lease: int = 0  # the target lease its puts go on (sync.cache_lease_ttl); 0: none
    # when the watcher received the oldest source event in the batch (Unix ms; 0: none, a
    # snapshot). Workers measure kvmesh_sync_lag_seconds from it; it decides nothing.
    event_ms: int = 0

    @cached_property
    def size(self) -> int:
        """Bytes its operations add to a request (op_size of each), summed once."""
        return sum(op_size(o.key, o.value) for o in self.ops)

    def encode(self, ops: Any = None) -> dict[str, Any]:
        """The batch's JSON object; *ops*, if given, stands for its encoded operations (a
        list already encoded, or the index of a task's shared list)."""
        extra: dict[str, Any] = {"lease": self.lease} if self.lease else {}
        if self.event_ms:
            extra["t"] = self.event_ms
        return {
            **extra,
            "source": self.source,
            "target": self.target,
            "shard": self.shard,
            "gen": self.gen,
            "prev": list(self.prev),
            "pos": list(self.pos),
            "done": self.done,
            "ops": encode_ops(self.ops) if ops is None else ops,
        }


def encode_ops(ops: Sequence[Operation]) -> list[list[str | None]]:
    """[kind, key, value] of each operation, once per key a watcher publishes: the kind is
    the Op itself, a str that JSON writes as its value, and base64 is called in place: a
    third less time than through Op.value and a helper of our own."""
    b2a = binascii.b2a_base64
    return [
        [
            op,
            b2a(key, newline=False).decode(),
            None if value is None else b2a(value, newline=False).decode(),
        ]
        for op, key, value in ops
    ]


def _pos(payload: dict[str, Any], name: str) -> Position:
    raw = payload.get(name)
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 63 for x in raw)
    ):
        raise MalformedBatchError(f"field {name!r} must be [revision, index], got {raw!r}")
    return (raw[0], raw[1])


def _str(payload: dict[str, Any], name: str) -> str:
    raw = payload.get(name)
    if not isinstance(raw, str) or not raw:
        raise MalformedBatchError(f"field {name!r} must be a non-empty string, got {raw!r}")
    return raw


_PUT, _DELETE = Op.PUT.value, Op.DELETE.value


def _b64(raw: Any, i: int, what: str) -> bytes:
    """Operation *i*'s *what* (key or value), decoded."""
    if not isinstance(raw, str):
        raise MalformedBatchError(f"op {i} {what} must be a base64 string")
    try:
        # strict: only the alphabet, and padding only at the end: the strings that
        # b64decode(validate=True) accepted, checked on every string of up to 6 characters
        # of a mixed alphabet (a non-ASCII string is a ValueError)
        return binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedBatchError(f"op {i} {what} is not valid base64") from None


MAX_BATCHES_PER_TASK = 64


@dataclass(frozen=True)
class SigningKeys:
    """The HMAC keys of task payloads: the first signs, any verifies (rotation)."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __repr__(self) -> str:
        return f"SigningKeys({len(self.keys)} keys)"


def key_id(key: bytes) -> str:
    """A short public name for a signing key (in each signature, so a verifier picks the
    key at once and can tell an unknown key from a wrong signature)."""
    return hashlib.sha256(b"kvmesh-key-id:" + key).hexdigest()[:16]


# How signed_json ends a payload's text: its signature as the last member, in one spelling.
_SIG_TAIL = re.compile(rb',"sig":\{"kid":"([0-9a-f]{16})","hmac":"([0-9a-f]{64})"\}\}')
_SIG_TAIL_LEN = len(b',"sig":{"kid":"' + b"0" * 16 + b'","hmac":"' + b"0" * 64 + b'"}}')


def canonical(payload: dict[str, Any]) -> bytes:
    """The signed bytes of a payload: everything but `sig`, in one spelling."""
    body = {k: v for k, v in payload.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class Signer:
    """Signs payloads with the first key and verifies them with any (key rotation)."""

    def __init__(self, keys: SigningKeys) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        self._sign_with = keys.keys[0]
        self._kid = key_id(self._sign_with)
        self._by_id = {key_id(k): k for k in keys.keys}

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "sig": self._sig(canonical(payload))}

    def signed_json(self, payload: dict[str, Any]) -> str:
        """The signed payload as compact JSON text (no spaces, ASCII only): the canonical
        bytes made for the signature, with `sig` appended as their last member. A reader
        parses it to the same object as `sign(payload)`; nothing is written out twice."""
        body = canonical(payload)
        sig = json.dumps(self._sig(body), separators=(",", ":"))
        members = body[1:-1].decode("ascii")
        return f'{{{members},"sig":{sig}}}' if members else f'{{"sig":{sig}}}'

    def _sig(self, body: bytes) -> dict[str, str]:
        # every byte string these keys sign is canonical() of a JSON object (tasks, their
        # retries, resync requests): verify_text relies on it, so sign nothing else with them
        mac = hmac.new(self._sign_with, body, hashlib.sha256).hexdigest()
        return {"kid": self._kid, "hmac": mac}

    def verify_text(self, text: bytes) -> bool:
        """Whether *text* is a payload as signed_json writes it, signed by one of our keys:
        the HMAC is taken over the bytes as they came, which are the canonical bytes but for
        the signature at their end, instead of over the payload parsed and written out
        again. False is no verdict: another spelling of a genuine payload (signed by
        sign(), then written out by Celery, say) is for verify() to judge."""
        m = _SIG_TAIL.fullmatch(text, max(0, len(text) - _SIG_TAIL_LEN))
        if m is None or not text.startswith(b"{"):
            return False
        key = self._by_id.get(m[1].decode())
        if key is None:
            return False
        mac = hmac.new(key, memoryview(text)[: m.start()], hashlib.sha256)
        mac.update(b"}")
        return hmac.compare_digest(mac.hexdigest().encode(), m[2])

    def check_text(self, text: bytes) -> None:
        """Raise UnsignedTaskError, UnknownKeyError or BadSignatureError unless
        verify_text(text), without parsing *text*: for a payload read by reference, which
        only watchers write, in the one spelling verify_text takes."""
        if self.verify_text(text):
            return
        m = _SIG_TAIL.fullmatch(text, max(0, len(text) - _SIG_TAIL_LEN))
        if m is None or not text.startswith(b"{"):
            if b'"sig"' not in text:
                raise UnsignedTaskError("the task carries no signature")
            raise BadSignatureError("its payload is not in the spelling watchers sign")
        if m[1].decode() not in self._by_id:
            raise UnknownKeyError(f"signed with key {m[1].decode()!r}, which is not ours")
        raise BadSignatureError("the signature does not match the content")

    def verify(self, payload: dict[str, Any]) -> None:
        """Raise UnsignedTaskError, UnknownKeyError or BadSignatureError unless the payload
        carries a valid signature."""
        sig = payload.get("sig")
        if sig is None:
            raise UnsignedTaskError("the task carries no signature")
        if not isinstance(sig, dict) or not isinstance(sig.get("kid"), str):
            raise BadSignatureError("field 'sig' must be {kid, hmac}")
        key = self._by_id.get(sig["kid"])
        if key is None:
            raise UnknownKeyError(f"signed with key {sig['kid'][:16]!r}, which is not ours")
        mac = sig.get("hmac")
        want = hmac.new(key, canonical(payload), hashlib.sha256).hexdigest()
        if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
            raise BadSignatureError("the signature does not match the content")


@dataclass(frozen=True)
class Task:
    batches: list[Batch]
    gap_since_ms: int | None = None  # when a batch of it first found its predecessor missing


def encode_task(
    batches: list[Batch], signer: Signer | None, gap_since_ms: int | None = None
) -> dict[str, Any]:
    """The task payload, signed unless *signer* is None (see _unsigned_task)."""
    payload = _unsigned_task(batches, gap_since_ms)
    return signer.sign(payload) if signer is not None else payload


def encode_task_json(
    batches: list[Batch], signer: Signer | None, gap_since_ms: int | None = None
) -> str:
    """The task payload of encode_task as compact JSON text, what a publisher puts in a
    message (its length is the task's size in kvmesh_watcher_task_bytes_published_total)."""
    payload = _unsigned_task(batches, gap_since_ms)
    if signer is not None:
        return signer.signed_json(payload)
    return json.dumps(payload, separators=(",", ":"))


def _unsigned_task(batches: list[Batch], gap_since_ms: int | None) -> dict[str, Any]:
    """The payload before its signature. A flush sends the same changes to every target, so
    a list of operations that several batches carry is written once, in the task's "ops",
    and those batches name it by index: the payload grows with the changes, and only a short
    header per target. Each distinct list is encoded once."""
    distinct: list[tuple[Operation, ...]] = []
    by_print: dict[tuple[int, bytes, bytes], list[int]] = {}
    which: list[int] = []
    for b in batches:
        # a cheap print picks the candidates; equal tuples are the same list. The batches
        # of one flush for several targets hold the very same Operation objects (a
        # Change makes its Operation once), and tuples compare those by identity first.
        fp = (len(b.ops), b.ops[0].key, b.ops[-1].key) if b.ops else (0, b"", b"")
        bucket = by_print.setdefault(fp, [])
        for i in bucket:
            if distinct[i] is b.ops or distinct[i] == b.ops:
                break
        else:
            i = len(distinct)
            distinct.append(b.ops)
            bucket.append(i)
        which.append(i)
    lists = [encode_ops(ops) for ops in distinct]
    uses = [0] * len(distinct)
    for i in which:
        uses[i] += 1
    shared: dict[int, int] = {}
    table: list[Any] = []
    encoded = []
    for b, i in zip(batches, which, strict=True):
        if uses[i] > 1:
            if i not in shared:
                shared[i] = len(table)
                table.append(lists[i])
            encoded.append(b.encode(shared[i]))
        else:
            encoded.append(b.encode(lists[i]))
    payload: dict[str, Any] = {"v": SCHEMA_VERSION, "batches": encoded}
    if table:
        payload["ops"] = table
    # what every batch would repeat is said once: the source (all share it) and done=true
    sources = {e["source"] for e in encoded}
    if len(sources) == 1:
        payload["source"] = sources.pop()
        for e in encoded:
            del e["source"]
    for e in encoded:
        if e["done"] is True:
            del e["done"]
    if gap_since_ms is not None:
        payload["gap_since"] = gap_since_ms
    return payload


def decode_task(payload: Any, signer: Signer | None) -> Task:
    """Verify (unless *signer* is None: the insecure unsigned mode) and decode a task
    payload; raise MalformedBatchError, or one of its kinds, with the reason."""
    if not isinstance(payload, dict):
        raise MalformedBatchError(f"payload must be a JSON object, got {type(payload).__name__}")
    try:
        if signer is not None:
            signer.verify(payload)
        return _decode(payload)
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        # whatever else a crafted payload trips over is still a malformed task
        raise MalformedBatchError(f"undecodable payload: {type(exc).__name__}") from None


def decode_task_text(text: bytes, signer: Signer | None) -> Task:
    """decode_task for a payload still in JSON text (one read from Redis by reference). It
    must be the text as the watcher writes it, verified as it is (Signer.check_text)
    before it is parsed; any other text is refused unparsed. Without a signer (the
    insecure unsigned mode) it is parsed as it comes."""
    if signer is not None:
        signer.check_text(text)
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedBatchError("its payload is not JSON") from None
    return decode_task(payload, None)


def _decode(payload: dict[str, Any]) -> Task:
    version = payload.get("v")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise MalformedBatchError(f"unsupported schema version {version!r}")
    unknown = set(payload) - {"v", "batches", "gap_since", "sig"}
    if version >= 3:
        unknown -= {"ops", "source"}
    if unknown:
        raise MalformedBatchError(f"unknown fields {sorted(unknown)}")
    raw = payload.get("batches")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCHES_PER_TASK:
        raise MalformedBatchError(
            f"field 'batches' must be a list of 1 to {MAX_BATCHES_PER_TASK} batches"
        )
    table = payload.get("ops", [])
    if not isinstance(table, list) or len(table) > len(raw):
        raise MalformedBatchError("field 'ops' must be a list of operation lists")
    shared = [_ops(t, f"shared list {i}") for i, t in enumerate(table)]
    source = payload.get("source")
    if source is not None:
        if not isinstance(source, str) or not source:
            raise MalformedBatchError(f"field 'source' must be a non-empty string, got {source!r}")
        raw = [{"source": source, **b} if isinstance(b, dict) else b for b in raw]
    batches = [decode_batch(b, shared) for b in raw]
    if len({b.source for b in batches}) != 1:
        raise MalformedBatchError("batches of one task must share their source")
    since = payload.get("gap_since")
    if since is not None and (
        not isinstance(since, int) or isinstance(since, bool) or not 0 < since < 1 << 53
    ):
        raise MalformedBatchError(f"field 'gap_since' must be milliseconds, got {since!r}")
    return Task(batches, since)


def _ops(raw_ops: Any, where: str = "field 'ops'") -> tuple[Operation, ...]:
    """Decode one list of operations: [kind, key, value], each key once."""
    if not isinstance(raw_ops, list):
        raise MalformedBatchError(f"{where} must be a list")
    # when the quick pass fails, the checked one gives the same verdict, with its reason
    try:
        ops = _well_formed_ops(raw_ops)
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return _checked_ops(raw_ops)
    if len({o.key for o in ops}) == len(ops):
        return ops
    del ops  # (a key twice) not held while the list is decoded again
    return _checked_ops(raw_ops)


def _well_formed_ops(raw_ops: list[Any]) -> tuple[Operation, ...]:
    """The operations of a list in which each is well formed, as _checked_ops decodes them,
    in about half its time (a worker decodes every key it writes); anything else raises
    TypeError or ValueError. Each must be a list (unpacking alone would take a string, or
    an object, of three members), and each member a string or null: a2b_base64 in strict
    mode then takes what _b64 does (which takes no bytes)."""
    if raw_ops and set(map(type, raw_ops)) != {list}:
        raise TypeError("an operation is not a list")
    if not set(map(type, chain.from_iterable(raw_ops))) <= _STR_OR_NULL:
        raise TypeError("a member of an operation is neither a string nor null")
    a2b, new, put, delete = binascii.a2b_base64, new_operation, Op.PUT, Op.DELETE
    return tuple(
        [
            new((put, a2b(key, strict_mode=True), a2b(value, strict_mode=True)))
            if kind == _PUT
            else new((delete, a2b(key, strict_mode=True), None))
            if kind == _DELETE
            else _unknown_kind()
            for kind, key, value in raw_ops
        ]
    )


_STR_OR_NULL = {str, type(None)}


def _unknown_kind() -> Operation:
    raise ValueError("an operation of unknown kind")


def _checked_ops(raw_ops: list[Any]) -> tuple[Operation, ...]:
    """_ops one operation at a time: the first that is malformed names the error."""
    ops: list[Operation] = []
    for i, raw in enumerate(raw_ops):
        if not isinstance(raw, list) or len(raw) != 3:
            raise MalformedBatchError(f"op {i} must be [kind, key, value]")
        kind, key, value = raw
        if kind == _PUT:
            ops.append(Operation(Op.PUT, _b64(key, i, "key"), _b64(value, i, "value")))
        elif kind == _DELETE:
            ops.append(Operation(Op.DELETE, _b64(key, i, "key")))
        else:
            raise MalformedBatchError(f"op {i} has unknown kind {kind!r}")
    if len({o.key for o in ops}) != len(ops):
        seen: set[bytes] = set()
        for i, o in enumerate(ops):
            if o.key in seen:
                raise MalformedBatchError(f"op {i} names a key twice in one batch")
            seen.add(o.key)
    return tuple(ops)


def decode_batch(payload: Any, shared: list[tuple[Operation, ...]] | None = None) -> Batch:
    """Decode and validate one batch of a task payload (*shared*: the task's shared
    operation lists, which the batch's "ops" may name by index)."""
    if not isinstance(payload, dict):
        raise MalformedBatchError(f"a batch must be a JSON object, got {type(payload).__name__}")
    gen = payload.get("gen")
    if not isinstance(gen, int) or isinstance(gen, bool) or not 1 <= gen < 1 << 63:
        raise MalformedBatchError(f"field 'gen' must be a positive integer, got {gen!r}")
    raw_ops = payload.get("ops")
    if isinstance(raw_ops, int) and not isinstance(raw_ops, bool):
        if not 0 <= raw_ops < len(shared or ()):
            raise MalformedBatchError(f"field 'ops' names shared list {raw_ops}, which is absent")
        ops = (shared or [])[raw_ops]
    else:
        ops = _ops(raw_ops)
    prev, pos = _pos(payload, "prev"), _pos(payload, "pos")
    if pos <= prev:
        raise MalformedBatchError(f"pos {pos} is not after prev {prev}")
    done = payload.get("done", True)
    if not isinstance(done, bool):
        raise MalformedBatchError("field 'done' must be a boolean")
    lease = payload.get("lease", 0)
    if not isinstance(lease, int) or isinstance(lease, bool) or not 0 <= lease < 1 << 63:
        raise MalformedBatchError(f"field 'lease' must be a lease ID, got {lease!r}")
    event_ms = payload.get("t", 0)
    if not isinstance(event_ms, int) or isinstance(event_ms, bool) or not 0 <= event_ms < 1 << 53:
        raise MalformedBatchError(f"field 't' must be milliseconds, got {event_ms!r}")
    return Batch(
        source=_str(payload, "source"),
        target=_str(payload, "target"),
        shard=_str(payload, "shard"),
        gen=gen,
        prev=prev,
        pos=pos,
        ops=ops,
        done=done,
        lease=lease,
        event_ms=event_ms,
    )
