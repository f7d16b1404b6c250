"""A small mesh for integration and end-to-end tests: etcd per cluster, Redis, a config file,
and kvmesh watcher and worker processes started through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, load_settings
from pipeline.etcd import Etcd
from pipeline.orphan import wrap
from pipeline.servers import (
    EtcdServer,
    MissingBinaryError,
    RedisServer,
    ServerProcess,
    find_binary,
)


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


def eventually(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll *check* until it returns a truthy value (returned) or raise after *timeout*."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)  # poll interval of eventually()
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


class Proc:
    """A kvmesh CLI process (or, with *command*, any command) with its log file."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str], command: list[str] | None = None
    ) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.popen = subprocess.Popen(
                # wrap(): an interrupted test run leaves nothing behind
                wrap([*(command or [sys.executable, "-m", "pipeline"]), *args]),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crashed host would."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Mesh:
    def __init__(
        self,
        servers: Servers,
        n: int = 2,
        sync: str = "",
        identities: str = "id",
        etcd_args: dict[int, list[str]] | None = None,
    ) -> None:
        self.servers = servers
        self.root = servers.root
        self.redis: RedisServer = servers.redis()
        self.etcds: list[EtcdServer] = [servers.etcd((etcd_args or {}).get(i)) for i in range(n)]
        self.names = [f"cluster-{chr(ord('a') + i)}" for i in range(n)]
        self.procs: list[Proc] = []
        self.sync_extra = sync
        self.identities = identities
        self.config = self.root / "mesh.toml"
        self.write_config()
        self.env = dict(os.environ, KVMESH_CONFIG=str(self.config))
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def write_config(self) -> None:
        lines = [
            "[broker]",
            f'url = "{self.redis.url}"',
            "visibility_timeout = 5",
            "",
            "[sync]",
            f'identities = "{self.identities}"',
            "shards = 4",
            "stall_timeout = 4",
            "fence_poll_interval = 0.3",
            self.sync_extra,
            "",
            "[worker]",
            "gap_wait = 0.5",
            "",
        ]
        for i, (name, etcd) in enumerate(zip(self.names, self.etcds, strict=True)):
            lines += [
                "[[clusters]]",
                f'name = "{name}"',
                f"id = {i + 1}",
                f'endpoints = ["{etcd.url}"]',
                "",
            ]
        self.config.write_text("\n".join(lines))

    @property
    def settings(self) -> Settings:
        return load_settings(str(self.config), env={})

    def client(self, i: int) -> Etcd:
        return Etcd(self.etcds[i].cluster(self.names[i], i + 1), timeout=5)

    def start(self, *args: str, log: str) -> Proc:
        p = Proc([*args, "--config", str(self.config)], self.root / f"{log}.log", self.env)
        self.procs.append(p)
        return p

    def watcher(self, name: str = "watch") -> Proc:
        return self.start("watch", log=name)

    def worker(self, name: str = "worker", concurrency: int = 2) -> Proc:
        return self.start(
            "worker", "--concurrency", str(concurrency), "--hostname", f"{name}@%h", log=name
        )

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def verify(self, wait: float = 60) -> subprocess.CompletedProcess[str]:
        return self.cli("verify", "--wait", str(wait), timeout=wait + 60)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
