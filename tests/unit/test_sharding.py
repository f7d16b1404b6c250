"""Shard assignment."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from pipeline.protocol.layout import RESOURCE_BY_NAME
from pipeline.protocol.sharding import (
    all_in_shard,
    all_shards,
    shard_index,
    shard_namer,
    shard_of,
    shard_resource,
)

IDS = RESOURCE_BY_NAME["identities"]


def test_shard_is_stable_across_processes() -> None:
    """The shard of a key does not depend on the process (Python's hash is salted)."""
    keys = [f"cilium/cache/identities/v1/a/id/{i}".encode() for i in range(50)]
    here = [shard_of(IDS, k, 8) for k in keys]
    code = (
        "import sys; from pipeline.protocol.sharding import shard_of; "
        "from pipeline.protocol.layout import RESOURCE_BY_NAME as R; "
        f"print(','.join(shard_of(R['identities'], k, 8) for k in {keys!r}))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
            text=True,
        ).stdout.strip()
        assert out.split(",") == here


def test_shards_spread_keys_and_stay_within_their_resource() -> None:
    """Keys spread over every shard of their resource, and a shard names its resource."""
    counts = Counter(shard_of(IDS, f"k/{i}".encode(), 8) for i in range(8000))
    assert set(counts) == {f"identities-{i}" for i in range(8)}
    assert min(counts.values()) > 700
    assert all(shard_resource(s) == "identities" for s in counts)


def test_single_key_resource_has_one_shard() -> None:
    """The cluster config is one key, so it has one shard."""
    assert shard_of(RESOURCE_BY_NAME["config"], b"anything", 8) == "config-0"
    shards = all_shards(4)
    assert shards.count("config-0") == 1
    assert len(shards) == 5 * 4 + 1


def test_all_in_shard_agrees_with_shard_index() -> None:
    """The worker's check of a whole batch says what shard_index says of each key."""
    keys = [f"cilium/cache/identities/v1/a/id/{i}".encode() for i in range(400)]
    for shards in (1, 3, 16):
        for index in range(shards):
            mine = [k for k in keys if shard_index(IDS, k, shards) == index]
            assert all_in_shard(IDS, mine, shards, index)
            others = [k for k in keys if shard_index(IDS, k, shards) != index]
            half = len(mine) // 2
            for k in others[:20]:  # one key of another shard, wherever it is
                for keys_ in ([k, *mine], [*mine[:half], k, *mine[half:]], [*mine, k]):
                    assert not all_in_shard(IDS, keys_, shards, index)
    single = RESOURCE_BY_NAME["config"]
    assert all_in_shard(single, [b"anything"], 16, 0)
    assert not all_in_shard(single, [b"anything"], 16, 1)


def test_shard_namer_agrees_with_shard_of() -> None:
    """A resync's namer, made once per resource, names every key's shard as shard_of does."""
    keys = [f"cilium/cache/identities/v1/a/id/{i}".encode() for i in range(400)]
    for res in (IDS, RESOURCE_BY_NAME["config"]):
        for shards in (1, 3, 16):
            name = shard_namer(res, shards)
            assert [name(k) for k in keys] == [shard_of(res, k, shards) for k in keys]
