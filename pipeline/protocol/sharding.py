"""Shard assignment. A shard is (resource, n): each resource is its own etcd watch, and etcd
orders events only within one watch, so a shard never mixes two watches.

The hash is stable across processes and restarts (Python's hash() is salted; this is not).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

from pipeline.protocol.layout import RESOURCES, Resource


def shard_count(resource: Resource, shards: int) -> int:
    return 1 if resource.single_key else shards


def shard_index(resource: Resource, key: bytes, shards: int) -> int:
    """The index of a source key's shard."""
    n = shard_count(resource, shards)
    return 0 if n == 1 else zlib.crc32(key) % n


def all_in_shard(resource: Resource, keys: Iterable[bytes], shards: int, index: int) -> bool:
    """Whether every key of *keys* is in shard *index* (shard_index for many keys, without
    a call per key: a worker checks every key it applies)."""
    n = shard_count(resource, shards)
    if n == 1:
        return index == 0
    crc32 = zlib.crc32
    return all(crc32(key) % n == index for key in keys)


def shard_of(resource: Resource, key: bytes, shards: int) -> str:
    """The shard name of a source key, e.g. `identities-3`."""
    return f"{resource.name}-{shard_index(resource, key, shards)}"


def shard_namer(resource: Resource, shards: int) -> Callable[[bytes], str]:
    """shard_of for many keys of one resource, its names made once (a resync names the
    shard of every key it lists)."""
    n = shard_count(resource, shards)
    names = [f"{resource.name}-{i}" for i in range(n)]
    if n == 1:
        return lambda _key: names[0]
    crc32 = zlib.crc32
    return lambda key: names[crc32(key) % n]


def all_shards(shards: int) -> list[str]:
    return [f"{r.name}-{i}" for r in RESOURCES for i in range(shard_count(r, shards))]


def shard_resource(shard: str) -> str:
    return shard.rsplit("-", 1)[0]
