"""Celery: the application workers consume with (and Flower and the tests publish with),
and hooks into a Celery worker. Watchers publish without it (pipeline.clients.publisher
writes Celery's message format to Redis directly) and never import Celery.

Built from settings by factories; nothing is read from the environment here.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from celery.utils.time import maybe_iso8601
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.control import Panel
from kombu import Queue  # type: ignore[attr-defined]  # re-exported lazily
from kombu.transport import TRANSPORT_ALIASES, _transport_cache
from kombu.transport import redis as kombu_redis

from pipeline.config import Settings
from pipeline.protocol.logs import one_line
from pipeline.protocol.names import queue_name


def restrict_remote_control(allowed: frozenset[str]) -> None:
    """Drop every Celery remote-control command of this process but *allowed*."""
    for name in list(Panel.data):
        if name not in allowed:
            del Panel.data[name]
            Panel.meta.pop(name, None)


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, with one client object kept for its own commands. kombu makes
    a new `redis.Redis` for each: twice per task in a worker's main process (the unacked
    bookkeeping when a task is handed out and when it is acknowledged), about 70 µs of CPU
    each here. The client is made again whenever kombu replaced its connection pool (after
    a fork, or a reconnect)."""

    _kept: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # kombu keeps those itself
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        kept = self._kept
        if kept is None or kept.connection_pool is not pool:
            kept = self._kept = super()._create_client()  # type: ignore[no-untyped-call]
        return kept


class _Transport(kombu_redis.Transport):
    Channel = _Channel


def keep_redis_clients() -> None:
    """Make this process's Celery use _Channel for redis:// and rediss:// brokers (a
    worker's; Flower and the tools keep kombu's own)."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:_Transport"
        _transport_cache.pop(scheme, None)  # kombu remembers what a name resolved to


def on_worker_logging(configure: Callable[[Any], None]) -> None:
    """Let *configure(loglevel)* set up a Celery worker's logging instead of Celery."""

    def _setup(loglevel: Any = None, **_: Any) -> None:
        configure(loglevel or "INFO")
        quiet_task_lines()

    # held strongly: a signal keeps only a weak reference by default, and this function
    # would be gone before the worker sends the signal (Celery's format would log what
    # a task carries, its ID included, as it came)
    signals.setup_logging.connect(_setup, weak=False)


log = logging.getLogger("kvmesh.worker")

# What Celery's consumer logs for a message it refuses before any task runs, by the reason
# it is counted under in kvmesh_worker_tasks_rejected_total
_REFUSALS = {
    celery_consumer.UNKNOWN_FORMAT: "unknown_format",
    celery_consumer.UNKNOWN_TASK_ERROR: "unknown_task",
    celery_consumer.INVALID_TASK_ERROR: "invalid_task",
    celery_consumer.MESSAGE_DECODE_ERROR: "undecodable",
}
REFUSAL_CHARS = 1024  # of such a line's text, kept
# what budget_refusal_lines installed in this process: (take, count, undo), or nothing
_refusals: list[tuple[Callable[[str], bool], Callable[[str], None], Callable[[], None]]] = []


def _optional(value: object, kinds: tuple[type, ...]) -> bool:
    return value is None or (isinstance(value, kinds) and not isinstance(value, bool))


def _schedulable(text: str) -> bool:
    """Whether *text* is an ISO 8601 time Celery can work with as an eta or expires: one
    within a day of the ends of what a datetime holds (year 1 or 9999 with an offset)
    overflows when Celery turns an eta into its clock's timestamp (and it logged a traceback
    for each such message, outside every budget) or works out a retry's expiry. A retry's
    eta is seconds away; 1970 to 9998 takes any clock."""
    if len(text) > 64:  # the longest ISO 8601 time is about 40 characters
        return False
    try:
        when = maybe_iso8601(text)
    except (ValueError, TypeError, OverflowError, AttributeError):
        return False
    return when is not None and 1970 <= when.year <= 9998


def task_message_error(headers: object, body: object) -> str | None:
    """Why a message is not a task message in Celery's protocol 2 as watchers and Celery's
    retries publish it, in what Celery's receiving code reads without checking (None: it
    is). Celery trusts these: a task ID or name that was not there, a body of another
    shape (a dict brings headers of its own), time limits that were not two numbers, stamps
    that were not a list made it raise, at once or later, in the pool, or hold a slot of the
    pool for good. *body* is None when it did not decode: Celery refuses it then."""
    if not isinstance(headers, dict):
        return "its headers are not a mapping"
    for name in ("id", "task"):
        if not isinstance(headers.get(name), str):
            return f"its header {name!r} is not a string"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list)
        and len(limits) == 2
        and all(x is None or (_optional(x, (int, float)) and 0 < x < 1e9) for x in limits)
    ):
        return "its header 'timelimit' is not two limits"
    for name in ("eta", "expires", "shadow", "root_id", "parent_id", "group"):
        if not _optional(headers.get(name), (str,)):
            return f"its header {name!r} is not text"
    for name in ("eta", "expires"):
        if headers.get(name) is not None and not _schedulable(headers[name]):
            return f"its header {name!r} is not a time from 1970 to 9998"
    for name in ("retries", "group_index", "replaced_task_nesting"):
        if not _optional(headers.get(name), (int,)):
            return f"its header {name!r} is not a number"
    for name in ("argsrepr", "kwargsrepr"):
        if not _optional(headers.get(name), (str,)):
            return f"its header {name!r} is not text"
    if not isinstance(headers.get("ignore_result"), (bool, type(None))):
        return "its header 'ignore_result' is not a flag"
    stamped = headers.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, list) and all(isinstance(x, str) for x in stamped)
    ):
        return "its header 'stamped_headers' is not a list of names"
    if not isinstance(headers.get("stamps"), (dict, type(None))):
        return "its header 'stamps' is not a mapping"
    if body is not None and not (
        isinstance(body, list)
        and len(body) == 3
        and isinstance(body[0], list)
        and isinstance(body[1], dict)
        and isinstance(body[2], (dict, type(None)))
    ):
        return "its body is not [args, kwargs, embed]"
    return None


class GuardedConsumer(celery_consumer.Consumer):  # type: ignore[misc]
    """Celery's consumer, which refuses a message whose headers Celery's own receiving code
    would trip on (task_message_error) before that code sees it, and catches what receiving
    a message raises otherwise: such an exception used to stop the worker, and the message,
    put back as it stopped, stopped the next one. Each such message is counted
    (`unreceivable`), logged on one line under the refusals' budget, and dropped. The
    broker connection's errors still go to Celery, which reconnects; but KeyError, which
    kombu counts among them and which a message's shape can raise, is the message's."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        receive = super().create_task_handler(*args, **kwargs)
        broker_errors = tuple(e for e in self.connection_errors if not issubclass(e, LookupError))

        def on_task_received(message: Any) -> Any:
            why: str | BaseException | None
            try:
                try:
                    body = message.payload  # decoded once: Celery reads the same
                except Exception:  # what does not decode, Celery refuses and counts
                    body = None
                why = task_message_error(message.headers, body)
                if why is None:
                    return receive(message)
            except broker_errors:
                raise
            except MemoryError:
                raise
            except Exception as exc:  # what a message's shape made Celery raise
                why = exc
            refused_message(message, why)
            return None

        return on_task_received


def refused_message(message: Any, why: str | BaseException) -> None:
    """Drop, count and log (under the budget) a message Celery cannot receive. Never
    raises."""
    try:
        if not message.acknowledged:
            message.reject(requeue=False)
        take, count = _refusals[0][:2] if _refusals else (lambda r: True, lambda r: None)
        count("unreceivable")
        if take("unreceivable"):
            if isinstance(why, BaseException):
                why = f"{type(why).__name__}: {why}"
            queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
            log.error(
                "refused a message Celery could not receive (queue %s): %s",
                one_line(str(queue))[:200],
                one_line(why)[:REFUSAL_CHARS],
            )
    except Exception as again:  # dropping it failed: it comes back after the visibility timeout
        log.error("dropping a message Celery could not receive failed: %s", type(again).__name__)


def budget_refusal_lines(take: Callable[[str], bool], count: Callable[[str], None]) -> None:
    """Celery's consumer logs each message it refuses before any task runs (an unknown task
    name, a body it cannot decode, an invalid or unknown message) with a traceback, the body
    and the headers, which whoever can write to Redis chooses, as often as it likes. Here
    each such message is counted (*count(reason)*), and its line is cut to REFUSAL_CHARS
    characters without the traceback and let through only while *take(reason)* allows.

    Celery's decoding error is counted here (its CRITICAL line always passes the logger's
    level); the other three by Celery's signals, whatever the level. A second call replaces
    what the first installed (one worker app per process; tests make several)."""
    unbudget_refusal_lines()

    def refuse(record: logging.LogRecord) -> bool:
        # record.msg: one of Celery's own constants, never text of the message
        reason = _REFUSALS.get(record.msg) if isinstance(record.msg, str) else None
        if reason is None:
            return True
        # logging does not catch what a filter raises: it would reach Celery's consumer
        # and stop the worker, so nothing here may raise
        try:
            if reason == "undecodable":
                count(reason)
            if not take(reason):
                return False
            text = one_line(record.getMessage())  # escaped first: then cut
        except Exception as exc:  # text that does not print, a count that failed
            text = f"{record.msg.splitlines()[0]} (not shown: {type(exc).__name__})"
        if len(text) > REFUSAL_CHARS:
            text = f"{text[:REFUSAL_CHARS]}... ({len(text)} characters)"
        record.msg, record.args = text, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def unknown(**_: Any) -> None:
        count("unknown_task")

    def rejected(exc: object = None, **_: Any) -> None:
        count("unknown_format" if exc is None else "invalid_task")

    logger = logging.getLogger(celery_consumer.__name__)
    logger.addFilter(refuse)
    signals.task_unknown.connect(unknown, weak=False)
    signals.task_rejected.connect(rejected, weak=False)

    def undo() -> None:
        logger.removeFilter(refuse)
        signals.task_unknown.disconnect(unknown)
        signals.task_rejected.disconnect(rejected)

    _refusals.append((take, count, undo))


def unbudget_refusal_lines() -> None:
    """Undo what budget_refusal_lines installed in this process, if anything."""
    while _refusals:
        _refusals.pop()[2]()


# Celery's lines for each task: received (main process), succeeded and retried (pool).
_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_task_lines() -> None:
    """Show Celery's per-task lines only when the root logger is at DEBUG: at INFO they are
    two lines per task (thousands a second under load, and a few percent of a worker's CPU
    at any rate), and kvmesh's metrics and its own lines say what they do. Failures stay:
    Celery logs them at ERROR."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in _PER_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def on_worker_lifecycle(
    *,
    init: Callable[[int], None],
    ready: Callable[[], None],
    process_started: Callable[[], None],
    process_ended: Callable[[int], None],
    shutdown: Callable[[], None],
) -> None:
    """Hooks into a Celery worker: *init(concurrency)* in its main process before the pool
    starts, *ready()* once it consumes, *process_started()* in each pool process as it
    starts, *process_ended(pid)* in a pool process that ends, *shutdown()* in its main process
    once it stopped consuming and its pool is gone."""

    def _init(sender: Any = None, **_: Any) -> None:
        pool = str(getattr(sender, "pool_cls", ""))
        # the solo pool runs one task at a time, whatever --concurrency says
        init(1 if "solo" in pool else int(getattr(sender, "concurrency", 0) or 1))

    def _ready(**_: Any) -> None:
        ready()

    def _ended(pid: int | None = None, **_: Any) -> None:
        if pid is not None:
            process_ended(int(pid))

    def _started(**_: Any) -> None:
        process_started()

    def _shutdown(**_: Any) -> None:
        shutdown()

    signals.worker_init.connect(_init, weak=False)
    signals.worker_process_init.connect(_started, weak=False)
    signals.worker_ready.connect(_ready, weak=False)
    signals.worker_process_shutdown.connect(_ended, weak=False)
    signals.worker_shutdown.connect(_shutdown, weak=False)


def create_app(settings: Settings, name: str = "kvmesh") -> Any:
    app = Celery(name, broker=settings.broker.url, set_as_current=False)
    if settings.broker.url.startswith("rediss://"):
        tls = settings.broker.tls
        app.conf.broker_use_ssl = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": tls.ca_file,
            "ssl_certfile": tls.cert_file,
            "ssl_keyfile": tls.key_file,
        }
    queues = [
        Queue(queue_name(c.name), routing_key=queue_name(c.name))  # type: ignore[no-untyped-call]
        for c in settings.sources
    ]
    app.conf.update(
        # JSON only on the wire: a worker never unpickles what a queue hands it.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: a task is acknowledged after it ran; a worker that dies mid-task
        # gives it back. The fence makes the resulting redeliveries harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.broker.visibility_timeout,
            "socket_keepalive": True,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry_on_timeout": True,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Every source queue is declared so Flower and `kvmesh status` see it before any
        # worker consumes it.
        task_queues=queues,
        task_default_queue=queues[0].name if queues else "kvmesh",
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.worker.task_events,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app
