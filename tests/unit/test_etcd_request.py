"""The transaction request the etcd client builds: each operation becomes the request etcd
expects, whatever its fields hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from etcd3.etcdrpc import TxnRequest

from pipeline.clients.etcd import Delete, Get, Put, Writes, _fill_ops, expand_writes, prefix_end
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.layout import Op
from pipeline.protocol.wire import Operation


def built(*ops: Any) -> list[Any]:
    request = TxnRequest()
    _fill_ops(request.success, ops)
    return list(request.success)


def test_each_operation_is_the_request_etcd_expects() -> None:
    put, leased, delete, prefix, get = built(
        Put(b"k1", b"v1"),
        Put(b"k2", b"v2", lease=7),
        Delete(b"k3"),
        Delete(b"dir/", prefix=True),
        Get(b"k4"),
    )
    assert put.WhichOneof("request") == "request_put"
    assert (put.request_put.key, put.request_put.value, put.request_put.lease) == (b"k1", b"v1", 0)
    assert (leased.request_put.key, leased.request_put.lease) == (b"k2", 7)
    assert delete.WhichOneof("request") == "request_delete_range"
    assert (delete.request_delete_range.key, delete.request_delete_range.range_end) == (b"k3", b"")
    assert prefix.request_delete_range.range_end == prefix_end(b"dir/")
    assert get.WhichOneof("request") == "request_range"
    assert get.request_range.key == b"k4"


def test_writes_are_the_requests_of_their_puts_and_deletes() -> None:
    """A Writes fills the very requests a Put (on its lease) or a Delete of each item would,
    in the items' order; expand_writes says which, for the fake etcd and for matching a
    branch's responses."""
    items = [
        Operation(Op.PUT, b"k1", b"v1"),
        Operation(Op.DELETE, b"k2"),
        Operation(Op.PUT, b"k3", b""),
    ]
    for lease in (0, 7):
        one_by_one = [Put(b"k1", b"v1", lease), Delete(b"k2"), Put(b"k3", b"", lease)]
        assert expand_writes([Get(b"g"), Writes(items, lease)]) == [Get(b"g"), *one_by_one]
        request, expected = TxnRequest(), TxnRequest()
        assert _fill_ops(request.success, [Writes(items, lease), Get(b"g")]) is True
        _fill_ops(expected.success, [*one_by_one, Get(b"g")])
        assert request.SerializeToString() == expected.SerializeToString()
    empty = built(Writes([Operation(Op.PUT, b"", b"")]))[0]
    assert empty.WhichOneof("request") == "request_put"


def test_the_fake_etcd_counts_and_applies_each_item_of_writes() -> None:
    """The in-memory etcd of the unit tests takes a Writes as etcd does: 128 keys at most
    in all, each key once, each item a put or a delete."""
    from tests.memory_etcd import MemoryEtcd

    etcd = MemoryEtcd("t")
    etcd.put(b"k/gone", b"old")
    puts = [Operation(Op.PUT, b"k/%d" % i, b"v") for i in range(128)]
    etcd.txn([], [Writes([*puts[:126], Operation(Op.DELETE, b"k/gone")]), Get(b"k/0")])
    assert etcd.get(b"k/gone") is None and etcd.count(b"k/") == 126
    for ops in ([Writes(puts), Get(b"k/0")], [Writes(puts[:2]), Put(b"k/1", b"again")]):
        with pytest.raises(RetryableError):
            etcd.txn([], ops)


def test_filling_says_whether_a_read_is_among_the_operations() -> None:
    """Etcd.txn walks a branch's responses only for its reads: a put's response says
    nothing it needs, and a full batch's are 35-55 µs of Python."""
    assert _fill_ops(TxnRequest().success, [Put(b"k", b"v"), Delete(b"d")]) is False
    assert _fill_ops(TxnRequest().success, []) is False
    assert _fill_ops(TxnRequest().failure, [Put(b"k", b"v"), Get(b"g")]) is True


def test_an_operation_whose_fields_are_all_empty_is_still_chosen() -> None:
    # an empty key leaves every field of the inner request at its default: the operation
    # must still say which request it is (assigning a field marks it chosen, even to its
    # default), or etcd receives an empty one
    delete, get = built(Delete(b""), Get(b""))
    assert delete.WhichOneof("request") == "request_delete_range"
    assert get.WhichOneof("request") == "request_range"


def test_only_a_refusal_for_size_is_taken_for_one() -> None:
    """etcd's RESOURCE_EXHAUSTED also means a full backend or too many requests: those are
    retried, never taken for a write too large (whose key the worker would delete)."""
    from pipeline.clients.etcd import _too_large

    exhausted, invalid = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
    assert _too_large(invalid, "etcdserver: request is too large")
    assert _too_large(exhausted, "grpc: received message larger than max (600100 vs. 528384)")
    assert _too_large(exhausted, "Sent message larger than max (600100 vs. 4194304)")
    assert not _too_large(exhausted, "etcdserver: mvcc: database space exceeded")
    assert not _too_large(exhausted, "etcdserver: too many requests")
    assert not _too_large(invalid, "etcdserver: key is not provided")
    assert not _too_large(grpc.StatusCode.UNAVAILABLE, "request is too large")


def test_what_only_the_operator_can_cure_is_told_from_an_etcd_down() -> None:
    """A missing permission, a lower --max-txn-ops and a refused login are RefusedError (the
    worker counts them as retry_refused); an etcd down, out of space or busy stays a plain
    retry."""
    from pipeline.clients.etcd import _retryable
    from pipeline.protocol.errors import PermissionDeniedError, RefusedError, TimedOutError

    def kind(code: grpc.StatusCode, details: str) -> type:
        return type(_retryable(_Refused(code, details), "txn", "b"))

    denied = kind(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
    assert denied is PermissionDeniedError and issubclass(denied, RefusedError)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert kind(invalid, "etcdserver: too many operations in txn request") is RefusedError
    # a login refused, and a token refused again after a new login (_call renews it once)
    assert kind(invalid, "etcdserver: authentication failed, invalid user ID or password") is (
        RefusedError
    )
    assert kind(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token") is (RefusedError)
    # the etcd's words go into log lines: escaped
    said = str(_retryable(_Refused(invalid, "bad\nWARNING forged\x1b[0m"), "txn", "b"))
    assert said.endswith(": bad\\x0aWARNING forged\\x1b[0m"), said
    for code, details in (
        (grpc.StatusCode.UNAVAILABLE, "connection refused"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"),
        (invalid, "etcdserver: duplicate key given in txn request"),
    ):
        assert kind(code, details) is RetryableError, details
    # a call that waited out its deadline: the worker pauses calls to that target a while
    assert kind(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") is TimedOutError


class _Refused(grpc.RpcError):
    """What gRPC raises for a call etcd refused."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),
        # a JWT token issued before a change to users or roles, until it expires
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old"),
    ],
)
def test_a_refused_token_is_renewed_once_and_the_call_made_again(
    code: grpc.StatusCode, details: str
) -> None:
    from pipeline.clients.etcd import Etcd
    from pipeline.config import ClusterConfig

    etcd = Etcd(ClusterConfig(name="t", id=1, endpoints=("http://127.0.0.1:9",)))
    etcd._user = "worker"  # a password user (the login itself is counted, not made)
    logins: list[int] = []

    def login() -> None:
        logins.append(1)
        etcd._logged_in = True

    etcd._login = login  # type: ignore[method-assign]
    answers: list[object] = [_Refused(code, details), 42]

    def call() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert etcd._call("txn", call) == 42
    assert len(logins) == 2
    etcd.close()


def test_a_login_waits_the_calling_threads_deadline_and_no_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A login made inside a thread's patience (the watcher's loop) asks etcd with that
    deadline, and waits for another thread's login at most that long; elsewhere it keeps
    the client's timeout. A thread that finds a token got while it waited uses it."""
    from types import SimpleNamespace

    from pipeline.clients.etcd import Etcd
    from pipeline.config import ClusterConfig
    from pipeline.protocol.errors import TimedOutError

    etcd = Etcd(ClusterConfig(name="t", id=1, endpoints=("http://127.0.0.1:9",)), timeout=30)
    etcd._user, etcd._password = "worker", "pw"
    deadlines: list[float] = []

    def authenticate(request: object, timeout: float) -> object:
        deadlines.append(timeout)
        return SimpleNamespace(token=f"t{len(deadlines)}")

    stub = SimpleNamespace(Authenticate=authenticate)
    monkeypatch.setattr(type(etcd._client), "authstub", property(lambda _: stub))
    try:
        etcd._login()
        assert deadlines == [pytest.approx(30, abs=1)] and etcd._logged_in
        etcd._login()  # logged in (by another thread, say): no second login
        assert len(deadlines) == 1
        etcd._logged_in = False  # the token was refused
        with etcd.patience(0.25):
            etcd._login()
        assert len(deadlines) == 2 and 0.2 < deadlines[1] <= 0.25
        assert etcd._client.metadata == (("token", "t2"),)
        etcd._logged_in = False
        etcd._token_lock.acquire()  # another thread's login, under way
        try:
            with etcd.patience(0.05), pytest.raises(TimedOutError) as raised:
                etcd._login()
        finally:
            etcd._token_lock.release()
        assert "another login did not end within 0.05 s" in str(raised.value)
        assert raised.value.cluster == "t"
        assert len(deadlines) == 2
    finally:
        etcd.close()


def test_the_etcd_s_words_are_escaped_in_every_error_made_from_them() -> None:
    """A request too large and a lease gone are errors of their own, and carry the etcd's
    words escaped as every other error does (they reach log lines and refusal records)."""
    from pipeline.clients.etcd import Etcd
    from pipeline.config import ClusterConfig
    from pipeline.protocol.errors import LeaseGoneError, RequestTooLargeError

    etcd = Etcd(ClusterConfig(name="t", id=1, endpoints=("http://127.0.0.1:9",)))
    for code, details, error in (
        (grpc.StatusCode.INVALID_ARGUMENT, "request is too large\nforged", RequestTooLargeError),
        (grpc.StatusCode.NOT_FOUND, "lease not found\nforged", LeaseGoneError),
    ):

        def call(c: grpc.StatusCode = code, d: str = details) -> object:
            raise _Refused(c, d)

        with pytest.raises(error) as raised:
            etcd._call("txn", call)
        assert "\n" not in str(raised.value) and "\\x0aforged" in str(raised.value)
    etcd.close()


def test_a_late_failure_marks_the_endpoint_its_call_went_to() -> None:
    """Calls of other threads still waiting on a dead member fail after the client moved
    on: they mark that member, not the live one now in use; a cluster of one endpoint
    never marks it (there is nothing to move to)."""
    from pipeline.clients.etcd import Etcd
    from pipeline.config import ClusterConfig

    dead, live = "127.0.0.1:9", "127.0.0.1:10"
    etcd = Etcd(ClusterConfig(name="t", id=1, endpoints=(f"http://{dead}", f"http://{live}")))
    client = etcd._client
    try:
        client._current_endpoint_label = dead
        etcd._endpoint_failed(grpc.StatusCode.UNAVAILABLE, dead)
        assert client.endpoints[dead].is_failed()
        client.channel  # noqa: B018 - the next call's channel: the client moves on
        assert client._current_endpoint_label == live
        etcd._endpoint_failed(grpc.StatusCode.DEADLINE_EXCEEDED, dead)  # a late one
        assert not client.endpoints[live].is_failed()
        assert client._current_endpoint_label == live
        etcd._endpoint_failed(grpc.StatusCode.INVALID_ARGUMENT, live)  # the request's fault
        assert not client.endpoints[live].is_failed()
    finally:
        etcd.close()
    one = Etcd(ClusterConfig(name="t", id=1, endpoints=(f"http://{dead}",)))
    try:
        one._endpoint_failed(grpc.StatusCode.UNAVAILABLE, dead)
        assert not one._client.endpoints[dead].is_failed()
    finally:
        one.close()


_SEEN_AT_IMPORT = r"""
import atexit, importlib.abc, os, sys

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "grpc" not in sys.modules:
            print("grpc loaded with", repr(os.environ.get("GRPC_EXPERIMENTS")))
        return None

sys.meta_path.insert(0, Watch())
atexit.register(lambda: print("grpc loaded" if "grpc" in sys.modules else "grpc not loaded"))
import %s
"""


@pytest.mark.parametrize(
    ("entry", "given"),
    [
        ("pipeline.tools.cli", None),  # watchers, workers and the other commands
        ("workers.app", None),  # `celery -A workers.app`, what `kvmesh worker` runs
        ("pipeline.clients.etcd", None),
        ("pipeline.clients.etcd", "event_engine_client"),
        ("pipeline.clients.etcd", ""),
    ],
)
def test_grpc_is_imported_with_its_eventengine_client_off(
    entry: str, given: str | None, tmp_path: Path
) -> None:
    """What gRPC reads when it is first imported, in a fresh process of each entry point:
    its EventEngine client off, unless GRPC_EXPERIMENTS is set (to anything)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "GRPC_EXPERIMENTS" and not k.startswith("KVMESH_")
    }
    if given is not None:
        env["GRPC_EXPERIMENTS"] = given
    config = tmp_path / "mesh.toml"  # workers.app loads $KVMESH_CONFIG as it is imported
    config.write_text(
        '[broker]\nurl = "redis://127.0.0.1:6379/0"\ninsecure_unsigned = true\n'
        '[[clusters]]\nname = "a"\nid = 1\nendpoints = ["http://127.0.0.1:2379"]\n'
        '[[clusters]]\nname = "b"\nid = 2\nendpoints = ["http://127.0.0.1:22379"]\n'
    )
    env["KVMESH_CONFIG"] = str(config)
    run = subprocess.run(
        [sys.executable, "-c", _SEEN_AT_IMPORT % entry],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    # an entry point that no longer loads gRPC at import has nothing to test here
    assert lines[-1:] == ["grpc loaded"], f"{entry} no longer loads gRPC when imported"
    expected = "-event_engine_client" if given is None else given
    assert lines[0] == f"grpc loaded with {expected!r}"
