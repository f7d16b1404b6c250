"""A small mesh for integration and end-to-end tests: etcd per cluster, Redis, a config file,
and kvmesh watcher and worker processes started through the real CLI.

Tests wait on state, never on log lines: the target's records, Redis (queue depth, the
messages workers hold unacknowledged, the workers' outcome counters), the watchers' Prometheus
metrics, and an in-process `verify`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.clients.broker import queue_depth, redis_client
from pipeline.clients.celeryapp import create_app
from pipeline.clients.etcd import Etcd
from pipeline.config import Settings, load_settings
from pipeline.protocol.errors import KvmeshError
from pipeline.protocol.fence import FenceRecord, GenRecord
from pipeline.protocol.names import fence_key, gen_key, progress_key, queue_name, stats_key
from pipeline.source.planner import Vouch, progress_vouch
from pipeline.tools.lab import scrape
from pipeline.tools.meshconfig import mesh_config, new_signing_key, write_secret
from pipeline.tools.orphan import wrap
from pipeline.tools.report import verify_once
from pipeline.tools.servers import (
    EtcdServer,
    EtcdTLS,
    MissingBinaryError,
    RedisServer,
    ServerProcess,
    find_binary,
    free_port,
    start_all,
    stop_all,
)

from .proxy import Proxy


def kvmesh(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the kvmesh CLI (`python -m pipeline ARGS`) as a user would, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def require_binary(name: str) -> str:
    try:
        return find_binary(name)
    except MissingBinaryError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {name}: {exc}")
        pytest.skip(str(exc))


def require_tls_redis(root: Path) -> str:
    """A redis-server built with TLS: Debian's redis-tools (scripts/test installs it) ships
    one executable that serves when called by a name with "redis-server" in it."""
    exe = Path("/usr/bin/redis-check-rdb")
    if not exe.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Debian's redis-tools for the TLS broker tests")
        pytest.skip("no TLS-capable redis-server (apt-get install redis-tools)")
    link = root / "redis-server-tls"
    if not link.exists():
        link.symlink_to(exe)
    return str(link)


class Servers:
    """Starts servers for one test and stops every one of them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []
        self._n = 0

    def etcd(
        self, extra_args: list[str] | None = None, start: bool = True, tls: EtcdTLS | None = None
    ) -> EtcdServer:
        require_binary("etcd")
        self._n += 1
        server = EtcdServer(self.root / f"etcd{self._n}", extra_args=extra_args, tls=tls)
        if start:
            server.start()
        self.started.append(server)
        return server

    def redis(self, start: bool = True, **kwargs: Any) -> RedisServer:
        if "binary" not in kwargs:
            require_binary("redis-server")
        self._n += 1
        server = RedisServer(self.root / f"redis{self._n}", **kwargs)
        if start:
            server.start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        stop_all(self.started)


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


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_values(samples: dict[str, float], name: str, **labels: str) -> list[float]:
    """Every sample of *name* whose labels include *labels*."""
    out = []
    for series, value in samples.items():
        m = _SERIES.match(series)
        if m is None or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append(value)
    return out


class Proc:
    """A kvmesh CLI process (or, with *command*, any command) with its log file. Watchers get
    a Prometheus port of their own, which is how tests read their state."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str],
        command: list[str] | None = None,
        metrics_port: int | None = None,
        metrics_var: str = "KVMESH_METRICS_WATCHER_PORT",
    ) -> None:
        self.log = log
        self.metrics_port = metrics_port
        self.served = False  # its metrics were read once: it serves them from then on
        self.node = ""  # a Celery worker's node name
        if metrics_port:
            env = dict(env, **{metrics_var: str(metrics_port)})
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

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children_pids(self) -> list[int]:
        """The PIDs of the processes it started, from /proc."""
        pid = self.popen.pid
        return sorted(
            int(child)
            for tasks in Path(f"/proc/{pid}/task").glob("*/children")
            for child in tasks.read_text().split()
        )

    def children_argv(self) -> list[list[str]]:
        """The command lines of the processes it started (a `kvmesh worker` starts its
        Celery worker as one), from /proc."""
        pid = self.popen.pid
        out = []
        for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in tasks.read_text().split():
                try:
                    raw = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:  # ended meanwhile
                    continue
                out.append(raw.decode(errors="replace").rstrip("\0").split("\0"))
        return out

    def metrics(self) -> dict[str, float]:
        """Its metrics; empty while it does not serve them (not yet, or no longer)."""
        assert self.metrics_port, "this process serves no metrics"
        port = self.metrics_port
        got = scrape(port)
        if not got and self.served and self.alive():
            # it served them before and still runs: a scrape that timed out on a loaded
            # machine is no reading (a test would take it for counters at zero)
            try:
                got = eventually(lambda: scrape(port), timeout=15, what=f"metrics on {port}")
            except AssertionError:
                return {}
        self.served = self.served or bool(got)
        return got

    def metric(self, name: str, **labels: str) -> float:
        """A metric of this watcher (summed over the other labels); 0 while unreachable."""
        return sum(metric_values(self.metrics(), name, **labels))

    def gauge(self, name: str, **labels: str) -> float | None:
        """A gauge of this watcher, or None while it is not served (yet)."""
        values = metric_values(self.metrics(), name, **labels)
        return sum(values) if values else None

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crashed host would."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        stop_procs([self])


def stop_procs(procs: list[Proc], timeout: float = 20) -> None:
    """SIGTERM every process group at once; SIGKILL what still runs after *timeout*."""
    running = [p for p in procs if p.alive()]
    for p in running:
        os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in running:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def with_sigcont(p: Proc) -> None:
    """Thaw a process group that a test may have frozen."""
    if p.alive():
        os.killpg(p.popen.pid, signal.SIGCONT)


class Mesh:
    """Etcd per cluster, Redis with a password, a signing key and a config file naming them
    all: a mesh as an operator would configure it, on loopback."""

    def __init__(
        self,
        servers: Servers,
        n: int = 2,
        sync: dict[str, Any] | None = None,
        identities: str = "id",
        etcd_args: dict[int, list[str]] | None = None,
        visibility_timeout: float = 5,
        worker: dict[str, Any] | None = None,
    ) -> None:
        self.servers = servers
        self.root = servers.root
        self.redis: RedisServer = self.make_redis(servers)
        self.names = [f"cluster-{chr(ord('a') + i)}" for i in range(n)]
        self.etcds: list[EtcdServer] = [
            servers.etcd((etcd_args or {}).get(i), start=False, tls=self.etcd_tls(i))
            for i in range(n)
        ]
        start_all([self.redis, *self.etcds])
        for i in range(n):
            self.prepare_etcd(i)
        self.procs: list[Proc] = []
        self.proxies: list[Proxy] = []
        self._app: Any = None
        self.sync_extra = sync or {}
        self.identities = identities
        self.visibility_timeout = visibility_timeout
        self.worker_extra = worker or {}
        self.signing_key = write_secret(self.root / "signing.key", new_signing_key())
        self.config = self.root / "mesh.toml"
        self.write_config()
        self.env = dict(os.environ, KVMESH_CONFIG=str(self.config))
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    # hooks for meshes with TLS and users (tests/integration/test_least_privilege.py)

    def make_redis(self, servers: Servers) -> RedisServer:
        """Redis, not started yet; with a password, as every broker should have."""
        return servers.redis(start=False, password=secrets.token_hex(8))

    def broker_tables(self) -> dict[str, Any]:
        """Extra [broker] settings (TLS files)."""
        return {}

    def etcd_tls(self, i: int) -> EtcdTLS | None:
        return None

    def prepare_etcd(self, i: int) -> None:
        """Runs once each etcd serves, before any kvmesh process starts."""

    def cluster_tables(self) -> list[dict[str, Any]]:
        """The `[[clusters]]` tables of the config (tests of credentials extend them)."""
        return [
            {"name": name, "id": i + 1, "endpoints": [etcd.url]}
            for i, (name, etcd) in enumerate(zip(self.names, self.etcds, strict=True))
        ]

    def write_config(self) -> None:
        self.config.write_text(
            mesh_config(
                broker_url=self.redis.url,
                clusters=self.cluster_tables(),
                signing_key_file=self.signing_key,
                broker={"visibility_timeout": self.visibility_timeout, **self.broker_tables()},
                sync={
                    "identities": self.identities,
                    "shards": 4,
                    "stall_timeout": 4,
                    "fence_poll_interval": 0.3,
                    "leader_ttl": 3,
                    **self.sync_extra,
                },
                worker=self.worker_extra,
            )
        )

    @property
    def settings(self) -> Settings:
        return load_settings(str(self.config), env={})

    def client(self, i: int) -> Etcd:
        return Etcd(self.etcds[i].cluster(self.names[i], i + 1), timeout=5)

    def start(
        self,
        *args: str,
        log: str,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        metrics: bool = False,
    ) -> Proc:
        p = Proc(
            [*args, "--config", str(config or self.config)],
            self.root / f"{log}.log",
            dict(self.env, **(env or {})),
            metrics_port=free_port() if metrics else None,
            metrics_var="KVMESH_METRICS_WORKER_PORT"
            if args[0] == "worker"
            else "KVMESH_METRICS_WATCHER_PORT",
        )
        self.procs.append(p)
        return p

    def watcher(
        self, name: str = "watch", config: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        return self.start("watch", log=name, config=config, env=env, metrics=True)

    def worker(
        self,
        name: str = "worker",
        concurrency: int = 2,
        metrics: bool = False,
        pool: str = "",
        config: Path | None = None,
    ) -> Proc:
        p = self.start(
            "worker",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            *(["--pool", pool] if pool else []),
            log=name,
            config=config,
            metrics=metrics,
        )
        p.node = f"{name}@{socket.gethostname()}"
        return p

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def verify(self, wait: float = 60) -> subprocess.CompletedProcess[str]:
        """`kvmesh verify` as a subprocess: for tests of the CLI itself."""
        return self.cli("verify", "--wait", str(wait), timeout=wait + 60)

    def verify_now(self) -> tuple[bool, list[str]]:
        """One in-process comparison of every target with its source (what `verify` does)."""
        return verify_once(self.settings, examples=3)

    def wait_equal(self, timeout: float = 90) -> list[str]:
        """Wait until every target equals its source; returns verify's lines."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while True:
            try:
                equal, lines = self.verify_now()
            except KvmeshError as exc:  # a store restarting: poll again
                equal, lines = False, [f"{type(exc).__name__}: {exc}"]
            if equal:
                return lines
            if time.monotonic() >= deadline:
                raise AssertionError(f"caches not equal within {timeout}s:\n" + "\n".join(lines))
            time.sleep(0.25)  # poll interval of wait_equal()

    # -- state the tests wait on ----------------------------------------------------------

    def redis_client(self) -> redis.Redis:
        return redis_client(self.settings)

    def queue_depth(self, source: str) -> int:
        return queue_depth(self.redis_client(), queue_name(source))

    def held_by(self, worker: Proc) -> dict[str, list[dict[str, Any]]]:
        """The batches of every task *worker* holds (reserved, running or waiting for its
        ETA) by task ID, as the worker itself reports through Celery's remote control."""
        if self._app is None:
            self._app = create_app(self.settings)
        assert worker.node, "not a worker"
        out: dict[str, list[dict[str, Any]]] = {}
        # a connection of its own each time: one kept from before a Redis restart (a test
        # may restart it) would answer nothing
        with self._app.connection_for_write() as conn:
            inspect = self._app.control.inspect(
                destination=[worker.node], timeout=2, connection=conn
            )
            for call in (inspect.reserved, inspect.active, inspect.scheduled):
                for info in (call() or {}).get(worker.node, []):
                    request = info.get("request", info)  # scheduled() wraps the request
                    args = request.get("args")
                    if isinstance(args, list) and args and isinstance(args[0], dict):
                        payload = args[0]
                        if "ref" in payload:  # published by reference: read it where it is
                            raw = self.redis_client().get(payload["ref"])
                            payload = json.loads(raw) if raw else {}
                        # schema 3 names the source once, for every batch
                        source = payload.get("source")
                        out[request["id"]] = [
                            {"source": source, **b} if source else b
                            for b in payload.get("batches", [])
                        ]
        return out

    def landed(self, batch: dict[str, Any]) -> bool:
        """Whether a batch can no longer land: its fence is at or past it, or in a newer
        generation."""
        client = self.client(self.names.index(batch["target"]))
        try:
            kv = client.get(fence_key(batch["source"], batch["shard"]))
        finally:
            client.close()
        if kv is None:
            return False
        fence = FenceRecord.decode(kv.value)
        return fence.gen > batch["gen"] or (
            fence.gen == batch["gen"] and fence.pos >= tuple(batch["pos"])
        )

    def stats(self, source: str, target: str) -> dict[str, int]:
        """The workers' outcome counters of one pair."""
        raw = self.redis_client().hgetall(stats_key(source, target))
        return {k.decode(): int(v) for k, v in raw.items()}

    def gen(self, source: str, target: str) -> int | None:
        """The generation of (source, target) in the target etcd, or None."""
        client = self.client(self.names.index(target))
        try:
            kv = client.get(gen_key(source))
        finally:
            client.close()
        return None if kv is None else GenRecord.decode(kv.value).gen

    def recorded(self, source: str, target: str) -> bool:
        """Whether the progress record of (source, target) vouches for every fence, as a new
        term requires to resume (watcher._vouch): a watcher killed now is resumed."""
        client = self.client(self.names.index(target))
        try:
            kv = client.get(gen_key(source))
            if kv is None:
                return False
            gen = GenRecord.decode(kv.value).gen
            kv = client.get(progress_key(source))
            vouch = progress_vouch(None if kv is None else kv.value, gen)
            if not isinstance(vouch, Vouch):
                return False
            _, fences = client.scan(fence_key(source, ""))
            return all(FenceRecord.decode(f.value).pos[0] <= vouch.revision for f in fences)
        finally:
            client.close()

    # -- conditions tests build -----------------------------------------------------------

    def backlog(self, tasks: int = 5, sources: list[str] | None = None) -> None:
        """With no worker consuming, wait until each source queue holds *tasks* tasks."""
        eventually(
            lambda: all(self.queue_depth(n) >= tasks for n in sources or self.names),
            timeout=60,
            what=f"a backlog of {tasks} tasks per source",
        )

    def worker_cut_off(self, name: str, concurrency: int = 2) -> tuple[Proc, list[Proxy]]:
        """A worker whose every connection to a target etcd goes through a proxy that
        forwards nothing: whatever it takes from the queue stays in its hands, unapplied,
        until the proxies heal. Returns the worker and its proxies (closed at the end)."""
        proxies = [Proxy(e.port) for e in self.etcds]
        for p in proxies:
            p.blackhole()
        self.proxies += proxies
        text = self.config.read_text()
        for e, p in zip(self.etcds, proxies, strict=True):
            text = text.replace(e.url, p.url)
        config = self.root / f"{name}.toml"
        config.write_text(text)
        w = self.worker(name, concurrency, config=config)
        return w, proxies

    def catch_in_hand(
        self, name: str, concurrency: int = 2
    ) -> tuple[Proc, list[Proxy], set[tuple[str, str]]]:
        """Start a worker cut off from its targets (see worker_cut_off) while a backlog waits,
        and wait until it holds batches that have not landed; returns it, its proxies and
        the pairs of those batches. A worker that took only tasks that can no longer land
        (a duplicate, an older generation's) is killed and another one takes the next
        tasks in the queue."""
        for attempt in range(10):
            worker, proxies = self.worker_cut_off(f"{name}-{attempt}", concurrency)
            held = eventually(
                lambda worker=worker: self.held_by(worker), timeout=60, what="a task in hand"
            )
            pending = {
                (b["source"], b["target"])
                for batches in held.values()
                for b in batches
                if not self.landed(b)
            }
            if pending:
                return worker, proxies, pending
            worker.kill()
        raise AssertionError("no worker took a task that had not landed")

    def pairs(self) -> list[tuple[str, str]]:
        return [(s, t) for s in self.names for t in self.names if s != t]

    def stop(self) -> None:
        """End of a test: kill every process it started (shutdown is not under test here;
        the lab's and the CLI's own tests cover it)."""
        for p in self.procs:
            with_sigcont(p)
            p.kill()
        for proxy in self.proxies:
            proxy.close()


def check_reads_at_a_past_revision(etcd: Any, prefix: bytes) -> None:
    """What SourceFeed.listing_gone asks of a source, at a revision it has passed: the keys
    a range held (count) and its newest write past a revision (latest_change), the same on
    a real etcd and on tests/memory_etcd.py; a compacted revision raises CompactedError."""
    from pipeline.protocol.errors import CompactedError

    etcd.put(prefix + b"x", b"1")
    etcd.put(prefix + b"y", b"1")
    first = etcd.revision()
    etcd.put(prefix + b"x", b"2")
    etcd.delete(prefix + b"y")
    etcd.put(prefix + b"z", b"1")
    later = etcd.revision()
    assert etcd.count(prefix, first) == 2
    assert etcd.count(prefix, later) == 2
    assert etcd.count(prefix + b"y", first, exact=True) == 1
    assert etcd.count(prefix + b"y", later, exact=True) == 0
    assert etcd.latest_change(prefix, first, revision=first) == 0
    assert etcd.latest_change(prefix, first - 1, revision=first) == first
    assert etcd.latest_change(prefix, first, revision=later) == later
    assert etcd.latest_change(prefix + b"x", first, exact=True, revision=later) == later - 2
    assert etcd.latest_change(prefix + b"y", 0, exact=True, revision=later) == 0
    etcd.compact(later)
    with pytest.raises(CompactedError):
        etcd.count(prefix, first)
    with pytest.raises(CompactedError):
        etcd.latest_change(prefix, 0, revision=first)
