"""The etcd client against a real etcd behind a proxy that can drop every packet: a thread's
own, shorter deadline (Etcd.patience), which the watcher's loop takes for its calls to
targets, ends its calls, lease calls included, without shortening another thread's."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from pipeline.clients.etcd import Etcd, Put
from pipeline.config import WRITE
from pipeline.protocol.errors import LeaseGoneError, RetryableError

from ..harness import Servers, eventually
from ..proxy import Proxy

pytestmark = pytest.mark.integration

KEY = b"kvmesh/state/a/probe"


def test_a_threads_patience_ends_its_calls_to_a_silent_etcd_and_no_one_elses(
    servers: Servers,
) -> None:
    etcd = servers.etcd()
    proxy = Proxy(etcd.port)
    client = Etcd(replace(etcd.cluster("b", 2), endpoints=(proxy.url,)), timeout=120, role=WRITE)
    pool = ThreadPoolExecutor(1)
    try:
        client.put(KEY, b"1")  # connected while the link passes traffic
        lease = client.grant_lease(60)
        proxy.blackhole()
        # another thread's call, begun first, waits the client's own timeout
        began = threading.Event()

        def patient_elsewhere() -> object:
            began.set()
            return client.get(KEY)

        elsewhere = pool.submit(patient_elsewhere)
        assert began.wait(10)
        with client.patience(0.5):
            with pytest.raises(RetryableError):
                client.get(KEY)
            with pytest.raises(RetryableError):
                client.put(KEY, b"2")
            for lease_call in (
                lambda: client.grant_lease(60),
                lambda: client.keepalive(lease),
                lambda: client.lease_keys(lease),
                lambda: client.revoke_lease(lease),
            ):
                began = time.monotonic()
                with pytest.raises(RetryableError):
                    lease_call()
                # ended by the thread's deadline, not the client's 120 s (nor the link's
                # keepalive, about 15 s)
                assert time.monotonic() - began < 10
        assert not elsewhere.done()  # a shared deadline would have ended it first
        proxy.heal()
        # the other thread's call ends with the connection the heal cuts, and the client
        # reconnects
        with contextlib.suppress(RetryableError):
            elsewhere.result(timeout=150)

        def answers() -> bool:
            with contextlib.suppress(RetryableError):
                return client.get(KEY) is not None
            return False

        eventually(answers, what="the client answers again")
    finally:
        proxy.heal()
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()
        proxy.close()


def test_a_lease_is_granted_kept_alive_listed_and_revoked(servers: Servers) -> None:
    """The lease calls the watcher makes with sync.cache_lease_ttl, against a real etcd: a
    key put on a lease is among its keys until the lease is revoked, which deletes it; a
    lease gone reads as such."""
    etcd = servers.etcd()
    client = Etcd(etcd.cluster("b", 2), role=WRITE)
    try:
        lease = client.grant_lease(60)
        assert lease > 0
        client.txn([], [Put(KEY, b"1", lease)])
        assert 0 < client.keepalive(lease) <= 60
        assert client.lease_keys(lease) == [KEY]
        client.revoke_lease(lease)
        assert client.get(KEY) is None
        assert client.lease_keys(lease) is None
        assert client.keepalive(lease) == 0
        with pytest.raises(LeaseGoneError):
            client.revoke_lease(lease)
    finally:
        client.close()
