"""One active watcher per source: a lease in Redis that the active watcher renews and any
standby watcher takes over once it expires.

Safety does not rest on the lease: generations in the targets already make a superseded
watcher's batches obsolete. The lease keeps two watchers from superseding each other over and
over. A watcher that cannot renew (it was paused, Redis lost the key, or Redis is down) steps
down at once and waits as a standby.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Any, Protocol

import redis

# Renew or delete only if we still own the key.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)


class Lease(Protocol):
    owner: str  # who this lease would name as the holder (for logs)

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> str | None: ...


class RedisLease:
    def __init__(self, url: str, source: str, ttl: float) -> None:
        self.key = f"kvmesh:leader:{source}"  # STABLE API: operators may read it
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(ttl * 1000)
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do)."""
        try:
            if self._redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
                return True
            return self.renew()
        except redis.RedisError:
            return False

    def renew(self) -> bool:
        try:
            return bool(self._redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms))
        except redis.RedisError:
            return False

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._redis.eval(_RELEASE, 1, self.key, self.owner)

    def holder(self) -> str | None:
        try:
            raw = self._redis.get(self.key)
        except redis.RedisError:
            return None
        return raw.decode() if isinstance(raw, bytes) else raw


class AlwaysLeader:
    """No election (tests of the watcher logic, or a deliberately single watcher)."""

    owner = "-"

    def acquire(self) -> bool:
        return True

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def holder(self) -> str | None:
        return None
