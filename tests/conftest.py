"""Shared fixtures: real etcd and Redis processes on free loopback ports with temporary data
dirs, stopped by pid (see harness.py), and a two-cluster mesh on top of them. A missing server
binary skips the test locally and fails it under CI=true."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Mesh, Servers


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def mesh(servers: Servers) -> Iterator[Mesh]:
    m = Mesh(servers)
    try:
        yield m
    finally:
        m.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test directory is a tier, marked as such: `-m "not faults and not e2e"` is the
    quick loop of scripts/test --quick."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "faults", "e2e"):
            item.add_marker(tier)
