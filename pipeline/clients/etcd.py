"""The one module that talks to etcd. Everything else sees plain bytes, revisions and
RetryableError; the client library (python-etcd3's API, compiled protobuf) stays behind this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, Protocol
from urllib.parse import urlsplit

# gRPC's EventEngine client passes every call through threads of its own: here about nine
# context switches per call instead of two, and about 40% more of the client's CPU per call,
# on a virtual machine where a wakeup costs tens of microseconds (docs/performance-log.md,
# "gRPC's EventEngine client off, adopted"). gRPC reads the setting once, when first imported,
# which in kvmesh's processes is here: so it is set before that, unless the environment
# already says otherwise (GRPC_EXPERIMENTS, docs/configuration.md).
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

import etcd3
import grpc
from etcd3 import etcdrpc
from etcd3.client import EtcdTokenCallCredentials

from pipeline.config import READ, ClusterConfig
from pipeline.protocol.errors import (
    CompactedError,
    LeaseGoneError,
    PermissionDeniedError,
    RefusedError,
    RequestTooLargeError,
    RetryableError,
    TimedOutError,
    WatchDeniedError,
    show_key,
)

log = logging.getLogger(__name__)

# Keepalives make a silent partition show up as an error instead of a hung watch.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),  # etcd refuses pings with no stream open
    ("grpc.http2.min_time_between_pings_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with *prefix* (etcd's range_end)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class KV(NamedTuple):
    """One key as read. A named tuple: a listing makes one per key, in under half the time
    of a frozen dataclass."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int = 0  # the lease the key is attached to; 0: none


# kvmesh's own operations, so that no module past this one knows the client library's


class Put(NamedTuple):
    """A named tuple, not a dataclass like the others: workers make one per key written,
    and a tuple is made in half the time."""

    key: bytes
    value: bytes
    lease: int = 0  # 0: no lease


@dataclass(frozen=True)
class Delete:
    key: bytes
    prefix: bool = False  # every key under *key*


@dataclass(frozen=True)
class Get:
    key: bytes


class KeyValue(Protocol):
    """What Writes takes for each key: a value of None deletes the key."""

    @property
    def key(self) -> bytes: ...

    @property
    def value(self) -> bytes | None: ...


class Writes(NamedTuple):
    """Many puts and deletes in one operation of a transaction, each an item with a key
    and a value (None: delete the key), the puts on *lease* (0: none). It counts as one
    operation of etcd's per key, as if each item were a Put or a Delete of its own.
    Workers write every key with it: filling the request from their own operations,
    without a Put made for each key, takes half the time (docs/performance-log.md)."""

    items: Sequence[KeyValue]
    lease: int = 0


TxnOp = Put | Delete | Get | Writes


def expand_writes(ops: Sequence[TxnOp]) -> list[Put | Delete | Get]:
    """*ops* with each Writes as the Puts and Deletes it stands for, in its items' order:
    what etcd receives, one operation per key."""
    out: list[Put | Delete | Get] = []
    for op in ops:
        if isinstance(op, Writes):
            out.extend(
                Delete(i.key) if i.value is None else Put(i.key, i.value, op.lease)
                for i in op.items
            )
        else:
            out.append(op)
    return out


@dataclass(frozen=True)
class ModIs:
    """A compare: the key's mod revision is *revision* (0: the key does not exist)."""

    key: bytes
    revision: int


@dataclass(frozen=True)
class ValueIs:
    """A compare: the key exists and its value is *value* (byte for byte)."""

    key: bytes
    value: bytes


Compare = ModIs | ValueIs


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction (its own, if it wrote)
    # one per Get of the branch that ran, in order: the success ops' if the compares held,
    # else the failure ops' (a failed compare can bring back what it needs to decide again)
    reads: list[KV | None]


def _compare(c: Compare) -> Any:
    if isinstance(c, ValueIs):
        # etcd fails a value compare on a key that does not exist, as wanted here
        return etcdrpc.Compare(
            key=c.key, target=etcdrpc.Compare.VALUE, result=etcdrpc.Compare.EQUAL, value=c.value
        )
    return etcdrpc.Compare(
        key=c.key, target=etcdrpc.Compare.MOD, result=etcdrpc.Compare.EQUAL, mod_revision=c.revision
    )


def _fill_ops(repeated: Any, ops: Sequence[TxnOp]) -> bool:
    """Add *ops* to a transaction's repeated field, each filled in place; returns whether
    one of them is a Get. Passing messages to a constructor copies each one: for 127 puts
    that was 205 µs against 89 µs here, in a path that runs for every key written."""
    add = repeated.add
    reads = False
    for op in ops:
        if isinstance(op, Writes):
            lease = op.lease
            for item in op.items:
                if item.value is None:
                    add().request_delete_range.key = item.key
                else:
                    put = add().request_put
                    put.key, put.value = item.key, item.value
                    if lease:
                        put.lease = lease
        elif isinstance(op, Put):
            put = add().request_put
            put.key, put.value = op.key, op.value
            if op.lease:
                put.lease = op.lease
        elif isinstance(op, Delete):
            delete = add().request_delete_range
            delete.key = op.key
            if op.prefix:
                delete.range_end = prefix_end(op.key)
        else:
            add().request_range.key = op.key
            reads = True
    return reads


@dataclass(frozen=True)
class Event:
    """One watch event. `index` is its position among the events of its revision in this watch."""

    revision: int
    index: int
    key: bytes
    value: bytes | None  # None for a delete


# What an event held in memory costs besides its key's and value's bytes: the object and
# the two bytes objects' headers (about 150 bytes measured with tracemalloc; rounded up).
EVENT_OVERHEAD = 200
# A watch hands its events over in parts of about this many bytes (keys, values and
# EVENT_OVERHEAD each), ending on a revision's last event: a watch that catches up on a long
# history gets up to a thousand revisions from etcd in one response, in fragments, which
# joined could be a gigabyte of values. A single revision of more than WATCH_SPLIT_PARTS
# parts' worth (the delete of a whole prefix, or a lease's end, can remove millions of
# keys at one revision) is handed over in parts of that size; each part but its last says
# the revision before as its header, since that one is not delivered whole yet.
WATCH_CHUNK_BYTES = 2 << 20
WATCH_SPLIT_PARTS = 4


def events_bytes(events: Sequence[Event]) -> int:
    """What *events* cost in memory, as WATCH_CHUNK_BYTES counts it."""
    return sum(
        len(ev.key) + (0 if ev.value is None else len(ev.value)) + EVENT_OVERHEAD for ev in events
    )


def _retryable(exc: BaseException, what: str, cluster: str) -> RetryableError:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (details or ""):
            return CompactedError(0)
        error = _refusal(code, details or "") or (
            TimedOutError if code == grpc.StatusCode.DEADLINE_EXCEEDED else RetryableError
        )
        return error(f"etcd {cluster}: {what} failed: {code}: {_said(details)}", cluster)
    return RetryableError(f"etcd {cluster}: {what} failed: {type(exc).__name__}: {exc}", cluster)


def _said(details: str | None) -> str:
    """An etcd's own words for an error message, escaped and cut: a source cluster's etcd
    is not trusted, and its words reach log lines and refusal records."""
    return show_key((details or "").encode(), 300)


# what says the endpoint, not the request, failed (as the library counts it)
_ENDPOINT_DOWN = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)


def _pass_on(exc: grpc.RpcError) -> NoReturn:
    raise exc


def _stale_token(code: Any, details: str) -> bool:
    """Whether etcd refused the call's token: expired or unknown (UNAUTHENTICATED), or
    issued before a change to users or roles ("revision of auth store is old", which a JWT
    token keeps saying until it expires). A new login answers both."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return True
    return code == grpc.StatusCode.INVALID_ARGUMENT and "auth store is old" in details


def _refusal(code: Any, details: str) -> type[RefusedError] | None:
    """The error for a request etcd refused that only its operator can make pass: a range
    the role lacks (PermissionDeniedError), more operations than its --max-txn-ops, a login
    refused (no such user, a wrong password), or a token refused again after a new login.
    None for anything else."""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RefusedError
    if code == grpc.StatusCode.INVALID_ARGUMENT and (
        "too many operations" in details or "authentication failed" in details
    ):
        return RefusedError
    return None


def _too_large(code: Any, details: str) -> bool:
    """Whether etcd refused a request for its size: its own limit (--max-request-bytes,
    INVALID_ARGUMENT "etcdserver: request is too large"), or gRPC's message size limit on
    either side ("received message larger than max", "sent message larger than max").
    RESOURCE_EXHAUSTED alone says nothing of the size: etcd also answers it for a full
    backend ("etcdserver: mvcc: database space exceeded", which still lets deletes through)
    and for "too many requests"; those are retried, never taken for an oversized write
    (the applier deletes a key whose put is too large)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "too large" in details
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details.lower()


class Stream(Protocol):
    """A watch, as its owner sees it."""

    def request_progress(self) -> None: ...

    def stop(self) -> None: ...


class EtcdClient(Protocol):
    """The etcd operations kvmesh uses: what Etcd does over gRPC and MemoryEtcd (its
    in-memory twin, for tests of the watcher and the workers) does in a dict."""

    name: str

    def close(self) -> None: ...

    def patience(self, seconds: float) -> contextlib.AbstractContextManager[None]: ...

    def header(self) -> tuple[int, int]: ...

    def revision(self) -> int: ...

    def get(self, key: bytes) -> KV | None: ...

    def count(self, prefix: bytes, revision: int | None = None, exact: bool = False) -> int: ...

    def latest_change(
        self, prefix: bytes, after: int, exact: bool = False, revision: int | None = None
    ) -> int: ...

    def scan(
        self, prefix: bytes, revision: int | None = None, page: int = 2000, exact: bool = False
    ) -> tuple[int, Iterator[KV]]: ...

    def keys(self, prefix: bytes, page: int = 2000) -> list[bytes]: ...

    def exists(self, key: bytes, revision: int | None = None) -> bool: ...

    def txn(
        self, compares: Sequence[Compare], ops: Sequence[TxnOp], failure: Sequence[Get] = ()
    ) -> TxnResult: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def delete_prefix(self, prefix: bytes) -> None: ...

    def grant_lease(self, ttl: int) -> int: ...

    def keepalive(self, lease_id: int) -> int: ...

    def lease_keys(self, lease_id: int) -> list[bytes] | None: ...

    def revoke_lease(self, lease_id: int) -> None: ...

    def watch(
        self,
        prefix: bytes,
        start_revision: int,
        on_events: Callable[[list[Event], int], None],
        on_error: Callable[[BaseException], None],
        exact: bool = False,
    ) -> Stream: ...


_RANGE_BUDGET = 16 * 1024 * 1024  # bytes a range page aims at, far below the receive cap
# ... and while the calling thread has a shorter deadline (Etcd.patience): a page of large
# values must come back within it over whatever link the etcd is behind (1 MiB in 2 s needs
# about 4 Mbit/s)
_PATIENT_RANGE_BUDGET = 1024 * 1024


class Etcd:
    """A connection to one etcd cluster, in one role: `read` (a watcher on its source) or
    `write` (workers and watchers on a target). Each role has its own credentials, so a
    source can be read by a user that may only read (Cilium's `remote` user).

    A user with a password logs in lazily, and again whenever etcd says its token is no
    longer valid (tokens expire after --auth-token-ttl of idleness, or on a JWT's schedule).
    """

    def __init__(self, cluster: ClusterConfig, timeout: float = 10.0, role: str = READ) -> None:
        self.name = cluster.name
        self.role = role
        self._timeout = timeout
        self._patient = threading.local()  # a thread's own deadline: see patience()
        who = cluster.credentials(role)
        self._user, self._password = who.username, who.password
        self._token_lock = threading.Lock()
        self._logged_in = False
        # A key this role may read, for requests that only want the response header: the
        # read role reads the cluster config of its own cluster, the write role kvmesh/.
        self._probe = (
            (f"cilium/cluster-config/{cluster.name}".encode(), None)
            if role == READ
            else (b"kvmesh/", prefix_end(b"kvmesh/"))
        )
        creds = None
        if cluster.tls.enabled:
            creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(
                cluster.tls.ca_file, who.key_file, who.cert_file
            )
        urls = [urlsplit(url) for url in cluster.endpoints]
        # a failed endpoint is not used for this long while another is there; with none
        # other (the library keys endpoints by host and port), there is nothing to wait for
        time_retry = 0.5 if len({(u.hostname, u.port or 2379) for u in urls}) > 1 else 0.0
        endpoints = [
            etcd3.Endpoint(
                # an IPv6 address keeps its brackets: gRPC reads "host:port"
                f"[{u.hostname}]" if ":" in (u.hostname or "") else u.hostname,
                u.port or 2379,
                secure=u.scheme == "https",
                creds=creds,
                time_retry=time_retry,
                opts=_GRPC_OPTIONS,
            )
            for u in urls
        ]
        try:
            # no user here: the library would log in at once, over the network; we log in
            # lazily and again when the token expires (see _login)
            self._client = etcd3.MultiEndpointEtcd3Client(
                endpoints=endpoints, timeout=timeout, failover=True
            )
        except (grpc.RpcError, etcd3.Etcd3Exception, ValueError) as exc:
            raise _retryable(exc, "connect", self.name) from None
        # The library marks the endpoint in use failed when an error of a call it wraps
        # comes back, whichever endpoint that call went to; _call does it for every call,
        # knowing which one (_endpoint_failed), so the library only passes the error on.
        self._client._manage_grpc_errors = _pass_on

    def close(self) -> None:
        self._client.close()

    @contextlib.contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        """Each call of the calling thread to etcd (reads, transactions, lease calls, a
        login) waits *seconds* at most (never longer than the client's timeout) while this
        lasts; other threads' calls keep theirs. A thread that holds up others while it
        waits (the watcher's loop) gives up on a silent etcd sooner than one that waits for
        it alone (a poller)."""
        before = self._patience()
        self._patient.seconds = min(seconds, self._timeout)
        try:
            yield
        finally:
            self._patient.seconds = before

    def _patience(self) -> float | None:
        """The calling thread's own deadline (patience()), if it has one."""
        seconds: float | None = getattr(self._patient, "seconds", None)
        return seconds

    def _deadline(self) -> float:
        return self._patience() or self._timeout

    def _range(self, key: bytes, end: bytes | None, **kwargs: Any) -> Any:
        """One Range call, waiting the calling thread's deadline at most."""
        request = self._client._build_get_range_request(key, range_end=end, **kwargs)
        return self._client.kvstub.Range(
            request,
            self._deadline(),
            credentials=self._client.call_credentials,
            metadata=self._client.metadata,
        )

    def _login(self) -> None:
        """Get a fresh token for the configured user (no-op without one), unless another
        thread got one while this one waited for it. The wait for the other thread and the
        login together take the calling thread's deadline at most."""
        if self._user is None:
            return
        deadline = self._deadline()
        began = time.monotonic()
        if not self._token_lock.acquire(timeout=deadline):
            raise TimedOutError(
                f"etcd {self.name}: login: another login did not end within {deadline:g} s",
                self.name,
            )
        if self._logged_in:  # another thread logged in meanwhile: its token serves
            self._token_lock.release()
            return
        left = max(0.001, deadline - (time.monotonic() - began))
        try:
            try:
                label = self._endpoint()
            except (etcd3.Etcd3Exception, ValueError) as exc:
                raise _retryable(exc, "login", self.name) from None
            try:
                resp = self._client.authstub.Authenticate(
                    etcdrpc.AuthenticateRequest(name=self._user, password=self._password),
                    left,
                )
            except grpc.RpcError as exc:
                self._endpoint_failed(exc.code(), label)
                raise _retryable(exc, "login", self.name) from None
            self._client.metadata = (("token", resp.token),)
            self._client.call_credentials = grpc.metadata_call_credentials(
                EtcdTokenCallCredentials(resp.token)
            )
            self._logged_in = True
        finally:
            self._token_lock.release()

    def _endpoint_failed(self, code: Any, label: str) -> None:
        """After a call to the endpoint *label* that could not reach it, the calls that
        follow go to another of the cluster's endpoints. The library does this only for the
        calls it wraps; transactions and logins go to its stubs directly. The endpoint the
        call went to is the one marked, not whichever is current when its error comes back:
        calls of other threads still waiting on a dead member must not mark the live one
        the client moved to meanwhile."""
        if code not in _ENDPOINT_DOWN or len(self._client.endpoints) < 2:
            return
        self._client.endpoints[label].fail()
        if self._client._current_endpoint_label == label:
            self._client._clear_old_stubs()

    def token_expired(self) -> None:
        """A watch was refused for its token: log in again before the next call."""
        self._logged_in = False

    def _endpoint(self) -> str:
        """The endpoint the next call goes to (the library moves off a failed one here)."""
        self._client.channel  # noqa: B018
        return str(self._client._current_endpoint_label)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in (1, 2):
            label = None
            try:
                if self._user is not None and not self._logged_in:
                    self._login()
                label = self._endpoint()
                return fn()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if label is not None:
                    self._endpoint_failed(code, label)
                if _stale_token(code, details) and self._user and attempt == 1:
                    self._logged_in = False  # the token expired: log in once more
                    continue
                if _too_large(code, details):
                    raise RequestTooLargeError(f"etcd {self.name}: {_said(details)}") from None
                if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
                    raise LeaseGoneError(f"etcd {self.name}: {_said(details)}") from None
                raise _retryable(exc, what, self.name) from None
            except (etcd3.Etcd3Exception, ValueError) as exc:
                raise _retryable(exc, what, self.name) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reads -------------------------------------------------------------------------------

    def header(self) -> tuple[int, int]:
        """(current revision, etcd cluster ID), from a count-only range over a key this role
        may read: a range over the whole keyspace needs permission on all of it."""
        key, end = self._probe
        resp = self._call("range", lambda: self._range(key, end, count_only=True))
        return int(resp.header.revision), int(resp.header.cluster_id)

    def revision(self) -> int:
        return self.header()[0]

    def get(self, key: bytes) -> KV | None:
        resp = self._call("get", lambda: self._range(key, None))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(kv.key, kv.value, kv.mod_revision, kv.lease)

    def count(self, prefix: bytes, revision: int | None = None, exact: bool = False) -> int:
        """How many keys are under *prefix* (or the one key, with exact=True) at *revision*
        (None: now). CompactedError if *revision* was compacted away. (etcd applies no
        mod revision filter to a count-only read: latest_change does that.)"""
        kwargs: dict[str, Any] = {"count_only": True}
        if revision:
            kwargs["revision"] = revision
        end = None if exact else prefix_end(prefix)
        try:
            resp = self._call("count", lambda: self._range(prefix, end, **kwargs))
        except CompactedError:
            raise CompactedError(revision or 0) from None
        return int(resp.count)

    def latest_change(
        self, prefix: bytes, after: int, exact: bool = False, revision: int | None = None
    ) -> int:
        """The highest mod revision above *after* among keys under *prefix* at *revision*
        (None: now), or 0. Deletes leave no key behind, so they are not seen here.
        CompactedError if *revision* was compacted away."""
        end = None if exact else prefix_end(prefix)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            resp = self._call(
                "range",
                lambda: self._range(
                    prefix,
                    end,
                    sort_order="descend",
                    sort_target="mod",
                    limit=1,
                    keys_only=True,
                    min_mod_revision=after + 1,
                    **kwargs,
                ),
            )
        except CompactedError:
            raise CompactedError(revision or 0) from None
        return int(resp.kvs[0].mod_revision) if resp.kvs else 0

    def scan(
        self, prefix: bytes, revision: int | None = None, page: int = 2000, exact: bool = False
    ) -> tuple[int, Iterator[KV]]:
        """All keys under *prefix* (or the one key, with exact=True) at one revision, read in
        pages. Returns (revision, iterator); the first page is read before returning."""
        end = None if exact else prefix_end(prefix)
        limit = page

        def fetch(start: bytes, rev: int | None) -> Any:
            """One page: the limit shrinks when etcd's answer would exceed what gRPC
            accepts, and is set from the bytes per key seen so far to stay near
            _RANGE_BUDGET (_PATIENT_RANGE_BUDGET on a thread with a shorter deadline), so a
            source with large values slows down instead of failing."""
            nonlocal limit
            while True:
                kwargs: dict[str, Any] = {"limit": limit}
                if rev:
                    kwargs["revision"] = rev

                def page_call(kw: dict[str, Any] = kwargs) -> Any:
                    return self._range(start, end, **kw)

                try:
                    resp = self._call("range", page_call)
                except CompactedError:
                    raise CompactedError(rev or 0) from None
                except RequestTooLargeError as exc:
                    if limit == 1:
                        raise RetryableError(
                            f"etcd {self.name}: one key under {prefix!r} is too large to read: "
                            f"{exc}",
                            self.name,
                        ) from None
                    limit = max(1, limit // 2)
                    continue
                if resp.kvs:
                    size = sum(len(kv.key) + len(kv.value) for kv in resp.kvs)
                    per_key = max(1, size // len(resp.kvs))
                    budget = _PATIENT_RANGE_BUDGET if self._patience() else _RANGE_BUDGET
                    limit = max(1, min(page, budget // per_key))
                return resp

        first = fetch(prefix, revision)
        rev = revision or int(first.header.revision)

        def pages() -> Iterator[KV]:
            resp = first
            while True:
                for kv in resp.kvs:
                    yield KV(kv.key, kv.value, kv.mod_revision, kv.lease)
                if exact or not resp.more or not resp.kvs:
                    return
                resp = fetch(resp.kvs[-1].key + b"\0", rev)

        return rev, pages()

    def items(
        self, prefix: bytes, revision: int | None = None, page: int = 2000
    ) -> dict[bytes, bytes]:
        _, it = self.scan(prefix, revision, page)
        return {kv.key: kv.value for kv in it}

    # -- writes ------------------------------------------------------------------------------

    def txn(
        self, compares: Sequence[Compare], ops: Sequence[TxnOp], failure: Sequence[Get] = ()
    ) -> TxnResult:
        """One transaction: if every compare holds, every op, in order; if not, the reads of
        *failure*. The result carries the revision it committed at (the mod revision of every
        key it wrote, with no read afterwards to race with) and what each Get of the branch
        that ran read."""
        request = etcdrpc.TxnRequest(compare=[_compare(c) for c in compares])
        reads_on_success = _fill_ops(request.success, ops)
        reads_on_failure = _fill_ops(request.failure, failure)

        def call() -> Any:
            return self._client.kvstub.Txn(
                request,
                self._deadline(),
                credentials=self._client.call_credentials,
                metadata=self._client.metadata,
            )

        resp = self._call("txn", call)
        succeeded = bool(resp.succeeded)
        reads: list[KV | None] = []
        if reads_on_success if succeeded else reads_on_failure:
            # only then: a response per put of a full batch is 35-55 µs of Python here
            branch = expand_writes(ops) if succeeded else failure
            for op, r in zip(branch, resp.responses, strict=True):
                if isinstance(op, Get):
                    kvs = r.response_range.kvs
                    reads.append(KV(kvs[0].key, kvs[0].value, kvs[0].mod_revision) if kvs else None)
        return TxnResult(succeeded, int(resp.header.revision), reads)

    def keys(self, prefix: bytes, page: int = 2000) -> list[bytes]:
        """The keys under *prefix*, without their values, read in pages."""
        out: list[bytes] = []
        start, end = prefix, prefix_end(prefix)
        while True:

            def page_call(first: bytes = start) -> Any:
                return self._range(first, end, limit=page, keys_only=True)

            resp = self._call("range", page_call)
            out += [kv.key for kv in resp.kvs]
            if not resp.more or not resp.kvs:
                return out
            start = resp.kvs[-1].key + b"\0"

    def exists(self, key: bytes, revision: int | None = None) -> bool:
        """Whether *key* exists (at *revision*; None: now), asked without its value: a
        count, whatever the value's size."""
        kwargs: dict[str, Any] = {"count_only": True}
        if revision:
            kwargs["revision"] = revision

        def call() -> Any:
            return self._range(key, None, **kwargs)

        resp = self._call("range", call)
        return int(resp.count) > 0

    def put(self, key: bytes, value: bytes) -> None:
        self.txn([], [Put(key, value)])

    def delete(self, key: bytes) -> None:
        self.txn([], [Delete(key)])

    def delete_prefix(self, prefix: bytes) -> None:
        self.txn([], [Delete(prefix, prefix=True)])

    def _lease(self, method: str, request: Any) -> Any:
        """One call of etcd's Lease service, waiting the calling thread's deadline at most
        (the library's lease calls always wait the client's timeout)."""
        return getattr(self._client.leasestub, method)(
            request,
            self._deadline(),
            credentials=self._client.call_credentials,
            metadata=self._client.metadata,
        )

    def grant_lease(self, ttl: int) -> int:
        request = etcdrpc.LeaseGrantRequest(TTL=ttl)
        return int(self._call("lease grant", lambda: self._lease("LeaseGrant", request)).ID)

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns its TTL, 0 if the lease is gone."""

        def call() -> list[Any]:
            request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
            return list(self._lease("LeaseKeepAlive", iter([request])))

        replies = self._call("lease keepalive", call)
        return max(0, int(replies[-1].TTL)) if replies else 0

    def lease_keys(self, lease_id: int) -> list[bytes] | None:
        """The keys a lease holds; None if the lease is gone."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True)
        info = self._call("lease info", lambda: self._lease("LeaseTimeToLive", request))
        return None if int(info.TTL) <= 0 else [bytes(k) for k in info.keys]

    def revoke_lease(self, lease_id: int) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        self._call("lease revoke", lambda: self._lease("LeaseRevoke", request))

    def compact(self, revision: int) -> None:
        self._call("compact", lambda: self._client.compact(revision, physical=True))

    # -- watch -------------------------------------------------------------------------------

    def watch(
        self,
        prefix: bytes,
        start_revision: int,
        on_events: Callable[[list[Event], int], None],
        on_error: Callable[[BaseException], None],
        exact: bool = False,
    ) -> WatchStream:
        """Watch *prefix* from *start_revision* on a thread of its own. `on_events(events,
        header_revision)` gets each response in order (events may be empty: a progress
        notification saying everything up to header_revision was delivered), a response
        of more than WATCH_CHUNK_BYTES in parts that each end on a whole revision (a part
        before the last says the revision of its last event), unless one revision alone is
        larger than WATCH_SPLIT_PARTS parts: a part that ends inside it says the revision
        before."""
        stream = WatchStream(
            self,
            prefix,
            None if exact else prefix_end(prefix),
            start_revision,
            on_events,
            on_error,
            WATCH_CHUNK_BYTES,
        )
        stream.start()
        return stream

    def _watch_call(self, requests: Iterator[Any]) -> Any:
        if self._user is not None and not self._logged_in:
            self._login()
        call = self._client.channel.stream_stream(
            "/etcdserverpb.Watch/Watch",
            request_serializer=_watch_request_bytes,
            response_deserializer=_watch_response,
        )
        return call(
            requests,
            credentials=self._client.call_credentials,
            metadata=self._client.metadata,
        )


# The client library's compiled protobuf predates etcd's watch fragments, so the two fields
# are spelled out on the wire here. With `fragment` set, etcd splits a watch response larger
# than its request limit (many large values in a few revisions) into several messages, each
# under gRPC's receive cap, instead of one that the client would refuse for ever.
_FRAGMENT_REQUEST = b"\x40\x01"  # WatchCreateRequest.fragment (field 8, varint) = true
_FRAGMENT_RESPONSE = 7  # WatchResponse.fragment (field 7, varint)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = raw[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


def _watch_request_bytes(req: Any) -> bytes:
    if req.HasField("create_request"):
        inner = bytes(req.create_request.SerializeToString()) + _FRAGMENT_REQUEST
        return b"\x0a" + _varint(len(inner)) + inner  # WatchRequest.create_request (field 1)
    return bytes(req.SerializeToString())


def _watch_response(raw: bytes) -> tuple[Any, bool]:
    """(the decoded response, whether more fragments of it follow)."""
    fragment = False
    i = 0
    while i < len(raw):
        tag, i = _read_varint(raw, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _read_varint(raw, i)
            if field == _FRAGMENT_RESPONSE:
                fragment = bool(value)
        elif wire == 2:
            length, i = _read_varint(raw, i)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            break  # not a field etcd sends; the decoder below judges the message
    return etcdrpc.WatchResponse.FromString(raw), fragment


class WatchStream:
    """One etcd watch on its own gRPC stream. It stops at the first error and reports it;
    the owner decides whether to reconnect (from the last revision it saw) or to resync."""

    def __init__(
        self,
        etcd: Etcd,
        key: bytes,
        range_end: bytes | None,
        start_revision: int,
        on_events: Callable[[list[Event], int], None],
        on_error: Callable[[BaseException], None],
        chunk_bytes: int,
    ) -> None:
        self._etcd = etcd
        self._chunk = chunk_bytes
        self._key = key
        self._range_end = range_end
        self._start = start_revision
        self._on_events = on_events
        self._on_error = on_error
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call: Any = None
        self._last_rev, self._index = -1, 0  # a revision's events may span responses
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"watch:{etcd.name}:{key!r}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def request_progress(self) -> None:
        """Ask etcd to confirm, with an empty response, how far this watch has delivered."""
        self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def stop(self) -> None:
        self._stopped.set()
        self._requests.put(None)
        call = self._call
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _request_iter(self) -> Iterator[Any]:
        create = etcdrpc.WatchCreateRequest(key=self._key, start_revision=self._start)
        if self._range_end is not None:
            create.range_end = self._range_end
        yield etcdrpc.WatchRequest(create_request=create)
        while not self._stopped.is_set():
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _run(self) -> None:
        try:
            self._call = self._etcd._watch_call(self._request_iter())
            events: list[Event] = []
            size = 0  # of events, as events_bytes counts it
            for resp, fragment in self._call:
                if self._stopped.is_set():
                    return
                if resp.compact_revision:
                    raise CompactedError(int(resp.compact_revision))
                if resp.canceled:
                    reason = str(resp.cancel_reason)
                    message = f"etcd {self._etcd.name}: watch canceled: {show_key(reason.encode())}"
                    if "permission denied" in reason or "auth" in reason:
                        # a token etcd no longer takes ("invalid auth token", "auth store is
                        # old", or in some versions "permission denied"), or a range the
                        # role may not read: a new token first, then the feed's waits
                        self._etcd.token_expired()
                        raise WatchDeniedError(message, self._etcd.name)
                    raise RetryableError(message, self._etcd.name)
                if resp.created and not resp.events:
                    continue
                for ev in resp.events:
                    rev = int(ev.kv.mod_revision)
                    if size >= self._chunk and (
                        rev != self._last_rev or size >= WATCH_SPLIT_PARTS * self._chunk
                    ):
                        # a new revision after a part's worth: hand over the whole
                        # revisions before it (all of them delivered, up to the last one);
                        # or a revision too large for one part: what came of it so far
                        if self._stopped.is_set():
                            return
                        whole = rev != self._last_rev
                        self._on_events(events, self._last_rev if whole else self._last_rev - 1)
                        events, size = [], 0
                    self._index = self._index + 1 if rev == self._last_rev else 0
                    self._last_rev = rev
                    kv = ev.kv
                    key, value = kv.key, None if ev.type == 1 else kv.value
                    events.append(Event(rev, self._index, key, value))
                    size += len(key) + (0 if value is None else len(value)) + EVENT_OVERHEAD
                if fragment:
                    continue  # more of this response follows
                self._on_events(events, int(resp.header.revision))
                events, size = [], 0
            if not self._stopped.is_set():
                raise RetryableError(f"etcd {self._etcd.name}: watch stream ended", self._etcd.name)
        except BaseException as exc:
            if self._stopped.is_set():
                return
            err: BaseException = exc
            if isinstance(exc, grpc.RpcError | etcd3.Etcd3Exception | ValueError):
                err = _retryable(exc, "watch", self._etcd.name)
            self._on_error(err)
