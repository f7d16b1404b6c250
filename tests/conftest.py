"""Shared fixtures: real etcd and Redis processes on free loopback ports with temporary data
dirs, stopped by pid. A missing binary skips the test locally and fails it under CI=true."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.servers import EtcdServer, MissingBinaryError, RedisServer, ServerProcess, find_binary


def require_binary(name: str) -> str:
    try:
        return find_binary(name)
    except MissingBinaryError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {name}: {exc}")
        pytest.skip(str(exc))


class Servers:
    """Starts servers for one test and stops every one of them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []
        self._n = 0

    def etcd(self, extra_args: list[str] | None = None) -> EtcdServer:
        require_binary("etcd")
        self._n += 1
        server = EtcdServer(self.root / f"etcd{self._n}", extra_args=extra_args)
        server.start()
        self.started.append(server)
        return server

    def redis(self) -> RedisServer:
        require_binary("redis-server")
        self._n += 1
        server = RedisServer(self.root / f"redis{self._n}")
        server.start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for s in self.started:
            s.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()
