"""Every name kvmesh shares with other processes, other versions, or operators, in one place.

WARNING - STABLE API. Watchers and workers of different versions meet through these names
(queues, the task name, records in every target etcd), and operators alert on some of them
(queues, counters, the lease). Change nothing here without a migration.
"""

from __future__ import annotations

import hashlib

# -- Redis ------------------------------------------------------------------------------------


def queue_name(source: str) -> str:
    """The Celery queue of one source cluster."""
    return f"kvmesh.{source}"


TASK_NAME = "kvmesh.apply_batch"  # the watcher publishes by this name


def stats_key(source: str, target: str) -> str:
    """The Redis hash of the workers' outcome counters of one pair (`kvmesh status`)."""
    return f"kvmesh:stats:{source}:{target}"


# A task whose payload is larger than this travels by reference (a claim check): the
# payload in a Redis string of its own, the Celery message naming it (architecture.md).
CLAIM_CHECK_BYTES = 16_384
# How long a payload waits in Redis for its task: far longer than a task waits in a queue
# that workers serve. A task that waited longer (workers down for an hour) finds its
# payload gone, and its pair is resynced, as it would be for the stall anyway; a payload
# nobody takes (workers too old to read references) is gone within the hour.
PAYLOAD_TTL_SECONDS = 3_600
_PAYLOAD_PREFIX = "kvmesh:payload:"
# kombu's Redis transport notes every message a worker has taken and not yet acknowledged
# in this sorted set (its default `unacked_index_key`, which kvmesh leaves as it is), the
# delivery tag scored by when the worker took it: a watcher looks up its own tasks there
# to tell which are still in a worker's hands (sync.flush_after_ack)
UNACKED_INDEX = "unacked_index"


def payload_key(token: str) -> str:
    """The Redis string holding the payload of a task published by reference (*token*: 32
    random hex digits, made by the publisher)."""
    return f"{_PAYLOAD_PREFIX}{token}"


def is_payload_key(name: object) -> bool:
    """Whether *name* is a name payload_key() makes: a worker reads no other key for a
    task, whatever a message names."""
    if not isinstance(name, str) or len(name) != len(_PAYLOAD_PREFIX) + 32:
        return False
    tail = name[len(_PAYLOAD_PREFIX) :]
    return name.startswith(_PAYLOAD_PREFIX) and all(c in "0123456789abcdef" for c in tail)


def leader_key(source: str) -> str:
    """The Redis key of the lease held by the active watcher of a source."""
    return f"kvmesh:leader:{source}"


# -- records in each target etcd --------------------------------------------------------------


# kvmesh's own bookkeeping in each target etcd, outside `cilium/` so agents never see it.
def state_prefix(source: str) -> bytes:
    return f"kvmesh/{source}/".encode()


def gen_key(source: str) -> bytes:
    return f"kvmesh/{source}/gen".encode()


def fence_key(source: str, shard: str) -> bytes:
    return f"kvmesh/{source}/fence/{shard}".encode()


def progress_key(source: str) -> bytes:
    return f"kvmesh/{source}/progress".encode()


def rejected_prefix(source: str) -> bytes:
    """Records of keys a target refused (too large), read by `kvmesh verify`."""
    return f"kvmesh/{source}/rejected/".encode()


def rejected_key(source: str, key: bytes) -> bytes:
    """The record of *key*, named by its SHA-256: a key too large for the target must not
    make its record too large as well. (Records written before 2026-11-30 are named by the
    key in URL-safe base64; `kvmesh verify` reads both.)"""
    return rejected_prefix(source) + hashlib.sha256(key).hexdigest().encode()


def draining_key(source: str) -> bytes:
    """Set in a target while a source that left the config is being drained from it."""
    return f"kvmesh/{source}/draining".encode()


def lease_prefix(source: str) -> bytes:
    """Records of the etcd leases a source's cached keys sit on (sync.cache_lease_ttl), so
    that whichever watcher is active keeps them alive."""
    return f"kvmesh/{source}/leases/".encode()


def lease_key(source: str, lease_id: int) -> bytes:
    return lease_prefix(source) + f"{lease_id:x}".encode()


def held_key(source: str) -> bytes:
    """Present while deletes of the source were held back for a missing source canary."""
    return f"kvmesh/{source}/held".encode()


def resync_key(source: str) -> bytes:
    return f"kvmesh/{source}/resync".encode()
