"""The Celery application shared by watchers (which publish) and workers (which consume).

Built from settings by a factory; nothing is read from the environment here.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]  # re-exported lazily

from .config import Settings, queue_name


def redis_client(settings: Settings, timeout: float = 5.0) -> redis.Redis:
    """A client of the broker's Redis (for queue depth, the leader lease, counters), with the
    broker URL's user and password and, for rediss://, the broker's TLS files."""
    tls = settings.broker.tls
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.broker.url.startswith("rediss://"):
        kwargs.update(
            ssl_cert_reqs="required",
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
        )
    return redis.Redis.from_url(settings.broker.url, **kwargs)


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
        worker_send_task_events=True,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app
