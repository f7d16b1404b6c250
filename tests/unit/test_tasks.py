"""The apply task's bookkeeping in Redis, with a fake broker and target: which payload a task
deletes when it ends, and which outcome counters go with that delete."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from celery.exceptions import Retry

from pipeline.clients.celeryapp import create_app
from pipeline.config import settings_from_mapping
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.layout import Op
from pipeline.protocol.names import payload_key
from pipeline.protocol.wire import Batch, Operation, Signer, encode_task_json
from workers.tasks import register_tasks

A, B = "cluster-a", "cluster-b"
REF = payload_key("0" * 32)


class FakeBroker:
    """The pool process's Redis: payloads by name (bytes, or an exception to raise), and
    every add_stats call as made."""

    def __init__(self, payloads: dict[str, Any]) -> None:
        self.payloads = payloads
        self.calls: list[tuple[list[tuple[str, str, dict[str, int]]], str | None]] = []

    def payload(self, key: str, limit: int) -> bytes | None:
        found = self.payloads.get(key)
        if isinstance(found, Exception):
            raise found
        return found

    def add_stats(self, counts: Any, drop: str | None = None) -> None:
        self.calls.append(([(s, t, dict(c)) for s, t, c in counts], drop))


class DownTarget:
    """A target etcd that does not answer."""

    txn_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            raise RetryableError("etcd: unavailable")

        return down


@pytest.fixture
def task() -> Any:
    settings = settings_from_mapping(
        {
            "broker": {"url": "redis://127.0.0.1:9/0"},
            "clusters": [
                {"name": A, "id": 1, "endpoints": ["http://127.0.0.1:9"], "target": False},
                {"name": B, "id": 2, "endpoints": ["http://127.0.0.1:9"], "source": False},
            ],
        },
        {"KVMESH_BROKER_SIGNING_KEYS": "k" * 40},
    )
    t = register_tasks(create_app(settings), settings)
    t.signer = Signer(settings.signing)
    return t


def use(task: Any, broker: FakeBroker) -> None:
    conns = task.conns
    conns._check_pid()  # this process's connections: the fakes
    conns._broker = broker
    conns._stores[B] = DownTarget()


def signed_text(task: Any) -> bytes:
    ops = (Operation(Op.PUT, f"cilium/cache/nodes/v1/{A}/n1".encode(), b"v"),)
    batch = Batch(A, B, "nodes-0", 1, (1, 0), (2, 0), ops)
    return encode_task_json([batch], task.signer).encode()


def test_a_payload_redis_would_not_hand_over_stays_for_the_retry(task: Any) -> None:
    """If Redis does not answer the read of a payload, the task is retried with the same
    message: the payload is not deleted, and nothing is counted."""
    broker = FakeBroker({REF: RetryableError("redis: reading a task's payload failed")})
    use(task, broker)
    with pytest.raises(Retry):
        task({"ref": REF})
    assert broker.calls == []


def test_a_refused_payload_is_deleted_with_its_count(task: Any) -> None:
    """A payload that is not JSON is refused: its count and its delete go to Redis
    together, once."""
    broker = FakeBroker({REF: b"\xffnot json"})
    use(task, broker)
    assert task({"ref": REF}) == "malformed"
    assert broker.calls == [([("-", "-", {"malformed": 1})], REF)]


def test_a_task_retried_for_its_target_deletes_its_payload_and_counts_once(task: Any) -> None:
    """A task whose target does not answer is retried with its batches in the retry's own
    message: its payload is deleted, in the same round trip as its counters, and the next
    task starts with nothing left to send."""
    broker = FakeBroker({REF: signed_text(task)})
    use(task, broker)
    with pytest.raises(Retry):
        task({"ref": REF})
    ((counts, drop),) = broker.calls
    assert drop == REF and counts == [(A, B, {"retry_unavailable": 1})]
    with pytest.raises(Retry):
        task({"ref": REF})
    assert len(broker.calls) == 2 and broker.calls[1] == broker.calls[0]


def test_each_thread_flushes_only_its_own_outcomes(task: Any) -> None:
    """In a thread pool the slots share one process: a task's flush sends what that task
    recorded, not what another slot recorded meanwhile."""
    broker = FakeBroker({})
    use(task, broker)
    conns = task.conns
    recorded = threading.Event()
    flushed = threading.Event()

    def other_slot() -> None:
        conns.record(A, B, Counter({"applied": 2}))
        recorded.set()
        flushed.wait(10)
        conns.flush()

    t = threading.Thread(target=other_slot)
    t.start()
    assert recorded.wait(10)
    conns.record(A, B, Counter({"duplicate": 1}))
    conns.flush(drop=REF)
    flushed.set()
    t.join(10)
    assert broker.calls == [
        ([(A, B, {"duplicate": 1})], REF),
        ([(A, B, {"applied": 2})], None),
    ]
