"""One active watcher per source: a lease in Redis that the active watcher renews and any
standby watcher takes over once it expires.

Safety does not rest on the lease: generations in the targets already make a superseded
watcher's batches obsolete. The lease keeps two watchers from superseding each other over and
over. One thing does rest on it: a watcher whose config lacks a source does not drain that
source while its lease has a value (lease_held, and pipeline/source/drain.py). A watcher
that cannot reach Redis steps down at once and waits as a standby.

Anyone who can write to Redis can write the lease key, so a value that is not ours is not
believed at once: a value that no live watcher renews (its TTL never goes up) is given a TTL
if it has none and left to expire, and the active watcher keeps its term meanwhile; it steps
down only when it sees the other value renewed, which only a live watcher does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Any, Protocol

import redis

from pipeline.protocol.errors import show_key
from pipeline.protocol.names import leader_key

# Renew if we own the key; take it again if it is gone. Otherwise return the other value's
# TTL in ms; a value without a TTL (-1), or with one longer than any watcher sets, gets the
# lease's TTL, so a value nobody renews is gone within one TTL.
_RENEW = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 'ours'
end
if not v then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'ours'
end
local ttl = redis.call('pttl', KEYS[1])
if ttl < 0 or ttl > tonumber(ARGV[2]) then
  redis.call('pexpire', KEYS[1], ARGV[2])
end
return tostring(ttl)
"""
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)


# Whether a source's lease has a value. One without a TTL is given a lease's TTL, as _RENEW
# gives it: a value nobody renews (written by hand, say) is gone within one TTL. A TTL is
# never shortened: a live watcher of a longer sync.leader_ttl (a config being rolled out)
# must not lose its lease between two renewals.
_HELD = """
if redis.call('exists', KEYS[1]) == 0 then
  return 0
end
if redis.call('pttl', KEYS[1]) < 0 then
  redis.call('pexpire', KEYS[1], ARGV[1])
end
return 1
"""


def lease_held(client: redis.Redis, source: str, ttl: float) -> bool | None:
    """Whether a watcher may be active for *source*: its lease key holds a value (a live
    watcher renews it; one with no TTL is given *ttl* seconds). None if Redis did not say
    (unreachable, or refusing the script). A watcher does not drain a source that another
    may still be syncing (drain.py)."""
    r: Any = client
    try:
        held = r.eval(_HELD, 1, leader_key(source), int(ttl * 1000))
    except redis.RedisError:
        return None
    return bool(int(held))


class Lease(Protocol):
    owner: str  # who this lease would name as the holder (for logs)

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> str | None: ...
    def unreachable(self) -> str | None:
        """Why the last acquire() could not ask the broker (None: it could)."""
        ...


class RedisLease:
    def __init__(self, client: redis.Redis, source: str, ttl: float) -> None:
        self.key = leader_key(source)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(ttl * 1000)
        self._redis: Any = client
        self._foreign_ttl: int | None = None  # the other value's TTL when last seen
        # until the first acquire() has asked the broker, nothing is known of it: a watcher
        # is not ready before then
        self._unreachable: str | None = "has not asked the broker yet"

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do). A value nobody renews is
        given a TTL, so a standby gets its turn once it expires."""
        try:
            if self._redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
                self._foreign_ttl, self._unreachable = None, None
                return True
            result = self._eval()
        except redis.RedisError as exc:
            kw = self._redis.connection_pool.connection_kwargs
            where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
            self._unreachable = f"cannot reach Redis at {where}: {type(exc).__name__}: {exc}"
            return False
        self._unreachable = None
        if result == "ours":
            self._foreign_ttl = None
            return True
        return False

    def renew(self) -> bool:
        """Keep the lease. False only if Redis is unreachable or another live watcher holds
        the key (its TTL went up since we last looked); a value that just sits there, as one
        written by hand would, does not make us step down."""
        try:
            result = self._eval()
        except redis.RedisError:
            return False
        if result == "ours":
            self._foreign_ttl = None
            return True
        ttl = int(result)
        if ttl < 0 or ttl > self.ttl_ms:
            ttl = self.ttl_ms  # the script just set it to that
        renewed = self._foreign_ttl is not None and ttl > self._foreign_ttl
        self._foreign_ttl = ttl
        return not renewed

    def _eval(self) -> str:
        raw = self._redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._redis.eval(_RELEASE, 1, self.key, self.owner)

    def unreachable(self) -> str | None:
        return self._unreachable

    def holder(self) -> str | None:
        """Who holds the lease, for a log line: escaped, since anyone who can write to Redis
        can write any bytes there."""
        try:
            raw = self._redis.get(self.key)
        except redis.RedisError:
            return None
        if raw is None:
            return None
        return show_key(raw if isinstance(raw, bytes) else str(raw).encode(), 100)


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

    def unreachable(self) -> str | None:
        return None
