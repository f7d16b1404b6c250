"""The apply task's bookkeeping in Redis, with a fake broker and target: which payload a task
deletes when it ends, and which outcome counters go with that delete."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import pytest
from celery import signals
from celery.exceptions import Retry
from celery.worker.consumer import consumer as celery_consumer

from pipeline.clients.celeryapp import (
    REFUSAL_CHARS,
    budget_refusal_lines,
    create_app,
    unbudget_refusal_lines,
)
from pipeline.config import settings_from_mapping
from pipeline.protocol.errors import RefusedError, RetryableError, TimedOutError
from pipeline.protocol.layout import Op
from pipeline.protocol.names import payload_key
from pipeline.protocol.wire import Batch, Operation, Signer, encode_task_json
from workers.tasks import RefusalLines, register_tasks

from ..harness import eventually

A, B = "cluster-a", "cluster-b"
REF = payload_key("0" * 32)


class FakeBroker:
    """The pool process's Redis: payloads by name (bytes, or an exception to raise), and
    every add_stats call as made."""

    def __init__(self, payloads: dict[str, Any]) -> None:
        self.payloads = payloads
        self.fail: Exception | None = None  # what add_stats raises, if set
        self.calls: list[tuple[list[tuple[str, str, dict[str, int]]], list[str]]] = []

    def payload(self, key: str, limit: int) -> bytes | None:
        found = self.payloads.get(key)
        if isinstance(found, Exception):
            raise found
        return found

    def add_stats(self, counts: Any, drops: Any = ()) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(([(s, t, dict(c)) for s, t, c in counts], list(drops)))


class DownTarget:
    """A target etcd that does not answer (or, given an error, answers with it)."""

    txn_seconds = 0.0

    def __init__(self, error: RetryableError | None = None) -> None:
        self.error = error or RetryableError("etcd: unavailable")

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return down


def pair_settings(*more_targets: str, **extra: Any) -> Any:
    """A → B (and → each of *more_targets*), with a signing key, and whatever sections
    *extra* adds."""
    targets = [
        {"name": t, "id": i, "endpoints": ["http://127.0.0.1:9"], "source": False}
        for i, t in enumerate((B, *more_targets), start=2)
    ]
    return settings_from_mapping(
        {
            "broker": {"url": "redis://127.0.0.1:9/0"},
            "clusters": [
                {"name": A, "id": 1, "endpoints": ["http://127.0.0.1:9"], "target": False},
                *targets,
            ],
            **extra,
        },
        {"KVMESH_BROKER_SIGNING_KEYS": "k" * 40},
    )


def apply_task(settings: Any) -> Any:
    """The apply task of a worker with *settings*, signing as its watchers do."""
    t = register_tasks(create_app(settings), settings)
    t.signer = Signer(settings.signing)
    return t


@pytest.fixture
def task() -> Any:
    return apply_task(pair_settings())


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
    """A payload that is not the watcher's signed text (here not even JSON) is refused:
    its count and its delete go to Redis together, once."""
    broker = FakeBroker({REF: b"\xffnot json"})
    use(task, broker)
    assert task({"ref": REF}) == "unsigned"
    assert broker.calls == [([("-", "-", {"unsigned": 1})], [REF])]


def test_a_task_retried_for_its_target_deletes_its_payload_and_counts_once(task: Any) -> None:
    """A task whose target does not answer is retried with its batches in the retry's own
    message: its payload is deleted, in the same round trip as its counters, and the next
    task starts with nothing left to send."""
    broker = FakeBroker({REF: signed_text(task)})
    use(task, broker)
    with pytest.raises(Retry):
        task({"ref": REF})
    ((counts, drop),) = broker.calls
    assert drop == [REF] and counts == [(A, B, {"retry_unavailable": 1})]
    with pytest.raises(Retry):
        task({"ref": REF})
    assert len(broker.calls) == 2 and broker.calls[1] == broker.calls[0]


def test_refused_tasks_are_logged_a_hundred_a_minute_for_each_reason(
    task: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can write to Redis can send tasks a worker refuses. Each is counted, and
    logged a line each up to 100 a minute for each reason; the rest are said in one line
    once their minute is over. The log line is the feature here."""
    broker = FakeBroker({})
    use(task, broker)
    now = [1000.0]
    task.conns.refusals._budget.clock = lambda: now[0]

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger="kvmesh.worker"):
        for _ in range(130):
            assert task({"batches": []}) == "unsigned"
        for _ in range(3):
            assert task() == "malformed"
        assert len(lines("rejected task")) == 103
        task.conns.refusals.say()  # what the process's thread does four times a minute
        assert lines("more tasks rejected") == []  # the minute is not over
        now[0] += 61.0
        task.conns.refusals.say()
        assert task() == "malformed"  # a new minute: logged
        assert len(lines("rejected task")) == 104
        (said,) = lines("more tasks rejected")
        assert said.startswith("30 more tasks rejected as unsigned in the last 60s")
    counted = Counter[str]()
    for counts, _ in broker.calls:
        for _, _, c in counts:
            counted.update(c)
    assert counted == {"unsigned": 130, "malformed": 4}


def test_what_a_minute_held_back_is_said_by_a_thread_and_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No task needs to come after a flood for its held-back lines to be said: a thread of
    the process says them once the minute is over. A process that ends says what its
    minute held back so far."""
    lines = RefusalLines(lines=1, window=0.2)
    ending = RefusalLines(lines=1, window=3600)
    try:
        with caplog.at_level(logging.ERROR, logger="kvmesh.worker"):
            assert [lines.take("unsigned") for _ in range(3)] == [True, False, False]
            eventually(
                lambda: any(
                    "2 more tasks rejected as unsigned" in r.getMessage() for r in caplog.records
                ),
                timeout=10,
                what="the held-back lines said by the thread",
            )
            for _ in range(4):
                ending.take("bad_signature")
            ending.say(every=True)
            assert any(
                "3 more tasks rejected as bad_signature" in r.getMessage() for r in caplog.records
            )
    finally:  # their threads would say lines into later tests
        lines.close()
        ending.close()


def test_celerys_lines_for_refused_messages_are_counted_short_and_budgeted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery logs a message it refuses before any task runs (here: an unknown task name,
    and a body it cannot decode) with a traceback and the message's headers, which whoever
    writes to Redis chooses. Each is counted, and its line is short, without the
    traceback, and under the budget of its reason."""
    counted: Counter[str] = Counter()
    lines = RefusalLines(lines=2)
    budget_refusal_lines(lines.take, lambda reason: counted.update([reason]))
    logger = logging.getLogger(celery_consumer.__name__)
    try:
        with caplog.at_level(logging.INFO, logger=celery_consumer.__name__):
            for _ in range(5):
                try:
                    raise KeyError("forged.task")
                except KeyError as exc:
                    logger.error(
                        celery_consumer.UNKNOWN_TASK_ERROR,
                        exc,
                        "body",
                        {"forged": "h" * 100_000},
                        {},
                        exc_info=True,
                    )
            signals.task_unknown.send(sender=None, message=None, exc=None, name="x", id="1")
            signals.task_rejected.send(sender=None, message=None, exc=None)
            signals.task_rejected.send(sender=None, message=None, exc=ValueError("pickle"))
            # a line whose text does not print (here: too many arguments) passes, short
            logger.warning(celery_consumer.UNKNOWN_FORMAT, 1, 2, 3)
            logger.critical(
                celery_consumer.MESSAGE_DECODE_ERROR, "boom", "x", "y", "{}", "body", exc_info=True
            )
            logger.warning("a line of Celery's that is no refusal")
        refused = [r for r in caplog.records if r.name == celery_consumer.__name__]
        # two unknown-task lines, the unprintable one, the decoding error, the other line
        assert len(refused) == 5
        for r in refused[:4]:
            assert r.exc_info is None and len(r.getMessage()) <= REFUSAL_CHARS + 40
        assert "h" * 100 in refused[0].getMessage()  # what the message said, cut short
        assert "not shown: TypeError" in refused[2].getMessage()
        assert counted == {
            "unknown_task": 1,
            "unknown_format": 1,
            "invalid_task": 1,
            "undecodable": 1,
        }
    finally:  # what it installed in this process goes, and the budget's thread
        lines.close()
        unbudget_refusal_lines()


def test_genuine_task_messages_pass_the_shape_check_and_odd_ones_do_not() -> None:
    """What a watcher publishes, and a retry as Celery writes it, pass GuardedConsumer's
    check; headers or a body that Celery's receiving code would trip on do not."""
    import json as _json

    from pipeline.clients.celeryapp import task_message_error
    from pipeline.clients.publisher import task_message

    message = _json.loads(task_message("kvmesh.a", '{"v":1}', "[a->b]", "gen1@host"))
    headers, body = message["headers"], _json.loads(message["body"])
    assert task_message_error(headers, body) is None
    retry = dict(headers, retries=3, eta="2026-11-30T23:00:00.000000+00:00")
    assert task_message_error(retry, body) is None
    assert task_message_error(dict(retry, expires="2026-12-01T00:00:00+01:00"), body) is None
    # the range's ends, with the widest offsets: taken, and Celery converts them as it
    # converts a retry's eta for its timer
    from celery.utils.time import maybe_iso8601, maybe_make_aware, timezone
    from kombu.asynchronous.timer import to_timestamp

    for edge in ("1970-01-01T00:00:00+23:59", "9998-12-31T23:59:59.999999-23:59"):
        assert task_message_error(dict(retry, eta=edge, expires=edge), body) is None
        to_timestamp(timezone.to_system(maybe_make_aware(maybe_iso8601(edge), timezone.local)))
    assert task_message_error(headers, None) is None  # undecodable: Celery refuses it
    odd: list[tuple[dict[str, Any], Any]] = [
        ({k: v for k, v in headers.items() if k != "id"}, body),
        (dict(headers, task=5), body),
        (dict(headers, timelimit=5), body),
        (dict(headers, timelimit=["a", None]), body),
        (dict(headers, timelimit=[True, None]), body),
        (dict(headers, eta=5), body),
        # times Celery parses and then cannot convert (a traceback per message, unbudgeted),
        # or cannot parse
        (dict(headers, eta="0001-01-01T00:00:00+14:00"), body),
        (dict(headers, eta="9999-12-31T23:59:59-14:00"), body),
        (dict(headers, eta="1969-12-31T23:59:59+00:00"), body),
        (dict(headers, eta="not a time"), body),
        (dict(headers, eta=""), body),
        (dict(headers, eta="2026-11-30T23:00:00." + "0" * 100 + "+00:00"), body),  # too long
        (dict(headers, expires="0001-01-01T00:00:00+14:00"), body),
        (dict(headers, shadow=[]), body),
        (dict(headers, retries="1"), body),
        (dict(headers, stamped_headers=5), body),
        (dict(headers, stamped_headers=[[1]]), body),
        (dict(headers, stamps=[]), body),
        (dict(headers, ignore_result="yes"), body),
        (headers, {"args": [], "kwargs": {}, "timelimit": 5}),  # a body with headers of its own
        (headers, 5),
        (headers, [[], {}, 5]),
        ([], body),
    ]
    for h, b in odd:
        assert task_message_error(h, b) is not None, (h, b)


def test_a_target_that_refuses_the_write_user_is_counted_apart(task: Any) -> None:
    """A target that answers PERMISSION_DENIED (or too many operations) is retried like
    one that does not answer, and counted as retry_refused: only its operator cures it."""
    broker = FakeBroker({REF: signed_text(task)})
    use(task, broker)
    refusal = "etcd b: txn failed: StatusCode.PERMISSION_DENIED: etcdserver: permission denied"
    task.conns._stores[B] = DownTarget(RefusedError(refusal, B))
    with pytest.raises(Retry):
        task({"ref": REF})
    ((counts, drop),) = broker.calls
    assert drop == [REF] and counts == [(A, B, {"retry_refused": 1})]


class CountedDownTarget(DownTarget):
    """A DownTarget that notes, in *calls*, its name each time it is called."""

    def __init__(self, name: str, calls: list[str], error: RetryableError | None = None) -> None:
        super().__init__(error)
        self.name, self.calls = name, calls

    def __getattr__(self, attr: str) -> Any:
        self.calls.append(self.name)
        return super().__getattr__(attr)


def test_a_target_whose_call_timed_out_gets_no_call_for_a_while(
    task: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that drops packets makes each call wait sync.etcd_timeout: for a while
    after such a timeout (target_pause, under the stall timeout), the tasks for it give
    their batches back without a call, counted as retry_paused and due back once the pause
    is over; then the next task tries it again. A failure that came back at once (the
    target answered, with an error) pauses nothing, and ends a pause."""
    broker = FakeBroker({REF: signed_text(task)})
    use(task, broker)
    calls: list[str] = []
    timeout = TimedOutError("etcd b: txn failed: StatusCode.DEADLINE_EXCEEDED", B)
    task.conns._stores[B] = CountedDownTarget(B, calls, timeout)
    assert 0 < task.conns.target_pause <= task.conns._settings.sync.stall_timeout / 4
    countdowns: list[float] = []

    def retry(**kwargs: Any) -> Retry:
        countdowns.append(kwargs["countdown"])
        return Retry()

    monkeypatch.setattr(task, "retry", retry)
    for outcome in ("retry_unavailable", "retry_paused", "retry_paused"):
        with pytest.raises(Retry):
            task({"ref": REF})
        assert broker.calls[-1][0] == [(A, B, {outcome: 1})]
    assert len(calls) == 1, calls
    # a paused target's batches are due back once the pause is over, not sooner
    assert countdowns[0] < 1.0 and countdowns[1] > 1.0, countdowns
    assert all(c <= task.conns.target_pause for c in countdowns), countdowns
    task.conns.target_pause = 0.0  # the pause is over
    with pytest.raises(Retry):
        task({"ref": REF})
    assert len(calls) == 2
    task.conns.target_pause = 60.0  # paused again, until a call comes back at once
    fast = RetryableError("etcd b: txn failed: StatusCode.UNAVAILABLE: connection refused", B)
    task.conns.timed_out(B, now=False)
    task.conns._stores[B] = CountedDownTarget(B, calls, fast)
    for expected in (3, 4):
        with pytest.raises(Retry):
            task({"ref": REF})
        assert len(calls) == expected, calls
        assert broker.calls[-1][0] == [(A, B, {"retry_unavailable": 1})]


def test_a_target_that_did_not_answer_lately_comes_after_the_others() -> None:
    """The batches of a task for a target that failed to answer lately (and is tried
    again) go after those of its other targets, which then land without waiting for it."""
    c = "cluster-c"
    task = apply_task(pair_settings(c))
    broker = FakeBroker({})
    use(task, broker)
    calls: list[str] = []
    task.conns._stores[B] = CountedDownTarget(B, calls)
    task.conns._stores[c] = CountedDownTarget(c, calls)
    task.conns.target_pause = 0.0
    task.conns.timed_out(c, now=True)  # a call to c timed out lately, to b never
    batches = [
        Batch(
            A,
            t,
            "nodes-0",
            1,
            (1, 0),
            (2, 0),
            (Operation(Op.PUT, f"cilium/cache/nodes/v1/{A}/n1".encode(), b"v"),),
        )
        for t in (c, B)  # c's first in the task
    ]
    with pytest.raises(Retry):
        task(json.loads(encode_task_json(batches, task.signer)))
    assert calls and calls[0] == B and c in calls, calls


def test_a_negative_retry_count_cannot_lose_a_retry(task: Any) -> None:
    """The message's retry count is a header no signature covers: a negative one counts as
    none, and the task's batches still go to their retry."""
    broker = FakeBroker({REF: signed_text(task)})
    use(task, broker)
    task.push_request(retries=-1)
    try:
        with pytest.raises(Retry):
            task({"ref": REF})
    finally:
        task.pop_request()
    ((counts, drop),) = broker.calls
    assert drop == [REF] and counts == [(A, B, {"retry_unavailable": 1})]


def never_due(task: Any) -> tuple[FakeBroker, Any]:
    """A fake broker for *task*, and its connections with counts that do not fall due
    during the test (sent only when a task or send_counts says so)."""
    broker = FakeBroker({})
    use(task, broker)
    task.conns.count_delay = 3600.0
    return broker, task.conns


def test_a_task_with_no_payload_leaves_its_outcomes_until_they_are_due(task: Any) -> None:
    """A task that has no payload to delete makes no round trip for its outcomes before
    they are due; sent, they go once."""
    broker, conns = never_due(task)
    conns.record(A, B, Counter({"applied": 2}))
    conns.flush()
    assert broker.calls == []
    conns.send_counts()  # what a pool process does as it ends
    conns.send_counts()
    assert broker.calls == [([(A, B, {"applied": 2})], [])]


def test_healthy_tasks_delete_their_payloads_with_their_outcomes_when_due(task: Any) -> None:
    """A healthy task's payload is deleted with the outcomes once they are due, not in a
    round trip of its own: two such tasks make no round trip, and the send then carries
    both payloads; an unusual outcome later sends at once whatever waits."""
    broker, conns = never_due(task)
    other = payload_key("1" * 32)
    for ref in (REF, other):
        conns.record(A, B, Counter({"applied": 1}))
        conns.flush(drop=ref)
    assert broker.calls == []
    conns.send_counts()  # due, or the pool process ends
    assert broker.calls == [([(A, B, {"applied": 2})], [REF, other])]
    conns.record(A, B, Counter({"applied": 1}))
    conns.flush(drop=REF)
    conns.record(A, B, Counter({"duplicate": 1}))
    conns.flush(drop=other)
    assert broker.calls[1:] == [([(A, B, {"applied": 1, "duplicate": 1})], [REF, other])]


def test_a_send_that_fails_gives_its_deletes_up(task: Any) -> None:
    """If Redis does not take a send, its payload deletes are not held for the next one
    (the payloads expire): nothing piles up while Redis is away."""
    broker, conns = never_due(task)
    other = payload_key("1" * 32)
    conns.record(A, B, Counter({"applied": 1}))
    conns.flush(drop=REF)
    broker.fail = ConnectionError("redis: gone")
    conns.send_counts()  # never raises
    broker.fail = None
    conns._broker = broker  # a failed send drops the client: the fake again
    conns.record(A, B, Counter({"applied": 1}))
    conns.flush(drop=other)
    conns.send_counts()
    assert broker.calls == [([(A, B, {"applied": 1})], [other])]


def test_a_forked_process_never_deletes_its_parents_payloads(task: Any) -> None:
    """What a process queued before a fork stays with it: the child (a new pool process)
    starts with nothing to send."""
    broker, conns = never_due(task)
    conns.flush(drop=REF)
    conns._pid = -1  # as in a child after a fork: another pid
    conns._check_pid()
    conns._broker = broker
    conns.send_counts()
    assert broker.calls == []


class _CountingLock:
    """A lock that counts who came to take it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts = 0

    def __enter__(self) -> None:
        self.attempts += 1  # before blocking: a slot waiting for the lock is counted
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_slots_that_start_at_once_wait_for_one_fresh_start(
    task: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a new process, the slots of a thread pool that begin their first tasks at once
    start the state afresh once, and none goes on before that is done: one that went on
    would record into state the fresh start then throws away."""
    conns = task.conns
    conns._check_pid()
    original = conns._reset
    lock = _CountingLock()
    monkeypatch.setattr(type(conns), "_pid_lock", lock)
    resets: list[int] = []
    found: list[bool] = []  # per slot that went on: whether the fresh start was done
    done = threading.Event()

    def slow_reset() -> None:
        resets.append(1)
        original()
        # the fresh start ends only once every other slot has either gone on or come to
        # wait for the lock
        eventually(
            lambda: lock.attempts + len(found) >= 4,
            timeout=10,
            interval=0.01,
            what="every slot at the fresh start",
        )
        done.set()

    monkeypatch.setattr(conns, "_reset", slow_reset)
    conns._pid = -1  # as in a new process

    def slot() -> None:
        conns._check_pid()
        found.append(done.is_set())

    slots = [threading.Thread(target=slot) for _ in range(4)]
    for t in slots:
        t.start()
    for t in slots:
        t.join(10)
    assert resets == [1] and found == [True] * 4


def test_a_payload_is_deleted_when_due_with_no_task_to_carry_it(task: Any) -> None:
    """A payload left by a task that recorded nothing (the pool idle after it) is deleted
    by the sender thread once due."""
    broker = FakeBroker({})
    use(task, broker)
    task.conns.count_delay = 0.05
    task.conns.flush(drop=REF)
    eventually(
        lambda: broker.calls == [([], [REF])],
        timeout=10,
        interval=0.01,
        what="the payload deleted",
    )


def test_a_task_with_an_unusual_outcome_sends_at_once(task: Any) -> None:
    """An outcome other than what every healthy task records (here a duplicate) goes to
    Redis as its task ends, with whatever waited before it."""
    broker, conns = never_due(task)
    conns.record(A, B, Counter({"applied": 1}))
    conns.flush()
    conns.record(A, B, Counter({"duplicate": 1, "applied": 0}))
    conns.flush()
    assert broker.calls == [([(A, B, {"applied": 1, "duplicate": 1})], [])]
    conns.record(A, B, Counter({"applied": 1}))
    conns.flush()
    assert len(broker.calls) == 1


def test_outcomes_of_every_slot_go_once_when_due_with_no_task_to_carry_them(task: Any) -> None:
    """In a thread pool the slots share one process: what each recorded reaches Redis
    once, within the delay, even if no task ends after it (the process's sender thread
    sends it)."""
    broker = FakeBroker({})
    use(task, broker)
    conns = task.conns
    conns.count_delay = 0.05

    def slot(outcome: str) -> None:
        for _ in range(100):
            conns.record(A, B, Counter({outcome: 1}))

    slots = [threading.Thread(target=slot, args=(o,)) for o in ("applied", "duplicate")]
    for t in slots:
        t.start()
    for t in slots:
        t.join(10)

    def sent() -> Counter[str]:
        return sum((Counter(c) for calls, _ in list(broker.calls) for _, _, c in calls), Counter())

    eventually(
        lambda: sent() == {"applied": 100, "duplicate": 100},
        timeout=10,
        interval=0.01,
        what="every slot's outcomes sent",
    )
    conns.send_counts()
    assert sent() == {"applied": 100, "duplicate": 100}


def test_a_worker_keeps_what_it_built_at_start_out_of_later_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's main process settles its heap (collects, then freezes what is left)
    before the pool forks, so that the pool inherits it, and again once it consumes: a
    full collection of the startup objects took 54-67 ms there."""
    from pipeline import heap
    from workers import tasks

    hooks: dict[str, Any] = {}
    calls: list[str] = []
    monkeypatch.setattr(tasks, "on_worker_lifecycle", lambda **kw: hooks.update(kw))
    monkeypatch.setattr(tasks, "keep_redis_clients", lambda: None)
    monkeypatch.setattr(tasks, "restrict_remote_control", lambda allowed: None)
    monkeypatch.setattr(tasks, "budget_refusal_lines", lambda take, count: None)
    monkeypatch.setattr(tasks, "settle_heap", lambda: calls.append("settle"))
    tasks.create_worker_app(pair_settings(metrics={"worker_port": 0}))
    hooks["init"](2)
    assert calls == ["settle"]  # before the pool forks
    hooks["ready"]()
    assert calls == ["settle", "settle"]  # and what the main process built since

    calls.clear()
    monkeypatch.setattr(heap.gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(heap.gc, "freeze", lambda: calls.append("freeze"))
    heap.settle_heap()
    assert calls == ["collect", "freeze"]  # what is garbage already is not kept for good


_FORK_WHILE_HELD = r"""
import os, threading
from workers.tasks import _PerProcess

held, release = threading.Event(), threading.Event()

def hold():
    with _PerProcess._pid_lock:
        held.set()
        release.wait()

holder = threading.Thread(target=hold)
holder.start()
held.wait()
pid = os.fork()  # while another thread holds the lock, as a pool's fork may happen
if pid == 0:
    os._exit(0 if _PerProcess._pid_lock.acquire(timeout=5) else 1)
release.set()
holder.join()
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_child_forked_while_the_start_lock_is_held_gets_a_free_one() -> None:
    """A fork copies a held lock as held, and no thread of the child would ever release
    it: the child's first task would hang at its fresh start. The child gets a new lock."""
    run = subprocess.run(
        [sys.executable, "-c", _FORK_WHILE_HELD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["child", "0"]
