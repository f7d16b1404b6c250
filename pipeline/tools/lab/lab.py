"""`kvmesh lab`: a whole mesh on one machine, without Docker.

It starts N etcd clusters, Redis, one watcher per source cluster, a worker pool, Flower and a
simulator per cluster, all on loopback with their data under one temporary directory; shows a
live view per source cluster; and on Ctrl-C or at the end of --duration stops the churn, waits
for the mesh to converge and prints the final report. No process outlives it: children are
stopped on every exit path, and the kernel stops them should the lab itself be killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.config import Settings, load_settings
from pipeline.protocol.errors import RetryableError
from pipeline.protocol.names import queue_name
from pipeline.tools.lab.supervisor import LabError, Supervisor
from pipeline.tools.lab.view import SourceView, line, render, scrape
from pipeline.tools.meshconfig import mesh_config, new_signing_key, write_secret
from pipeline.tools.report import MeshView
from pipeline.tools.servers import EtcdServer, RedisServer, free_port, reserve

__all__ = ["Lab", "LabError", "LabOptions", "run_lab", "scrape"]


@dataclass
class LabOptions:
    clusters: int = 3
    identities: int = 1100
    churn: float = 20.0
    workers: int = 2
    duration: float = 60.0
    flower_port: int = 0
    flower_auth: str = ""
    identities_mode: str = "id"
    converge_timeout: float = 120.0
    keep: bool = False
    data_dir: str = ""  # the lab's data directory (created, must be empty); "": a temporary one
    prometheus: bool = False  # start a Prometheus that scrapes the watchers and the worker
    prometheus_port: int = 0  # its web port; 0: a free one


@dataclass
class Lab:
    """A mesh on this machine: the supervisor's processes, one config written by
    tools.meshconfig, and a MeshView kept open behind the live view."""

    opts: LabOptions
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvmesh-lab-")))
    names: list[str] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    worker_metrics_port: int = 0
    views: dict[str, SourceView] = field(default_factory=dict)
    flower_url: str = ""
    prometheus_url: str = ""
    flower_user: str = "admin"
    flower_password: str = ""
    config: Path = Path()
    settings: Settings | None = None
    supervisor: Supervisor = field(init=False)
    mesh_view: MeshView | None = None
    started_at: float | None = None  # monotonic: when every cluster was populated

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.root)

    # -- starting ---------------------------------------------------------------------------

    def start(self, say: Any = print) -> None:
        o = self.opts
        for port in (o.flower_port, o.prometheus_port):
            if port:
                reserve(port)  # picked for us: no server of ours gets it first
        self.names = [f"cluster-{i + 1}" for i in range(o.clusters)]
        say(f"lab: data under {self.root}")
        # Redis with a password, and tasks signed with a key of the lab's own, as in any
        # real deployment: both live in files readable by the lab's user only
        redis = RedisServer(self.root / "redis", aof=True, password=secrets.token_urlsafe(16))
        etcds = [EtcdServer(self.root / name) for name in self.names]
        self.supervisor.start_servers([redis, *etcds])
        say(
            f"lab: redis on redis://127.0.0.1:{redis.port}/0 (password in {self.root}), etcd on "
            + ", ".join(f"{n}={e.url}" for n, e in zip(self.names, etcds, strict=True))
        )
        key = write_secret(self.root / "signing.key", new_signing_key())
        url = write_secret(self.root / "broker.url", redis.url)
        self.config = self.root / "mesh.toml"
        self.config.write_text(
            mesh_config(
                broker_url="",
                broker={"url_file": url},
                clusters=[
                    {"name": name, "id": i + 1, "endpoints": [e.url]}
                    for i, (name, e) in enumerate(zip(self.names, etcds, strict=True))
                ],
                signing_key_file=key,
                sync={"identities": o.identities_mode},
                worker={"concurrency": o.workers},
            )
        )
        self.settings = load_settings(str(self.config), env={}, keys=False)
        self.mesh_view = MeshView(self.settings)
        for i, name in enumerate(self.names):
            self.spawn(
                f"simulate-{name}",
                [
                    "simulate",
                    "--cluster",
                    name,
                    "--identities",
                    str(o.identities),
                    "--churn",
                    str(o.churn),
                    "--seed",
                    str(i),
                ],
            )
        # "populated" is the line `kvmesh simulate` prints once its cluster holds its state
        self.supervisor.wait_logs([f"simulate-{n}" for n in self.names], "populated", 120)
        say(f"lab: {o.clusters} simulated clusters populated ({o.identities} identities each)")
        self.started_at = time.monotonic()
        self.worker_metrics_port = free_port()
        self.spawn(
            "worker",
            ["worker", "--concurrency", str(o.workers), "--hostname", "lab-worker@%h"],
            env={"KVMESH_METRICS_WORKER_PORT": str(self.worker_metrics_port)},
        )
        for name in self.names:
            port = free_port()
            self.metrics_ports[name] = port
            self.spawn(
                f"watch-{name}",
                ["watch", "--source", name],
                env={"KVMESH_METRICS_WATCHER_PORT": str(port)},
            )
        self._start_flower()
        if o.prometheus:
            self._start_prometheus()
        self.views = {n: SourceView(n) for n in self.names}
        say(
            f"lab: flower on {self.flower_url} (user {self.flower_user}, "
            f"password {self.flower_password})"
        )
        say("lab: metrics on " + " ".join(self.metrics_urls()))
        if self.prometheus_url:
            say(f"lab: prometheus on {self.prometheus_url}")

    def metrics_urls(self) -> list[str]:
        """The /metrics URL of every watcher, then of the worker."""
        ports = [*(self.metrics_ports[n] for n in self.names), self.worker_metrics_port]
        return [f"http://127.0.0.1:{p}/metrics" for p in ports]

    def _start_flower(self) -> None:
        o = self.opts
        port = o.flower_port or free_port()
        if o.flower_auth:
            user, _, password = o.flower_auth.partition(":")
            if not user or not password:
                raise LabError("--flower-auth must be USER:PASS")
            self.flower_user, self.flower_password = user, password
        else:
            self.flower_password = secrets.token_urlsafe(12)
        celery = Path(sys.executable).parent / "celery"
        cmd = [
            str(celery) if celery.exists() else "celery",
            "-A",
            "pipeline.tools.flowerapp",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ]
        # credentials go through the environment, not the command line (ps shows argv)
        self.spawn(
            "flower",
            cmd,
            env={
                "FLOWER_BASIC_AUTH": f"{self.flower_user}:{self.flower_password}",
            },
            kvmesh=False,
        )
        self.flower_url = f"http://127.0.0.1:{port}"

    def _start_prometheus(self) -> None:
        """A real Prometheus scraping every watcher and the worker each second, with
        kvmesh's alert rules when this is a source checkout (deploy/prometheus/)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise LabError(
                "--prometheus: no prometheus binary on PATH (apt-get install prometheus)"
            )
        port = self.opts.prometheus_port or free_port()
        rules = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "alerts.yml"
        watchers = [f"127.0.0.1:{self.metrics_ports[n]}" for n in self.names]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)] if rules.exists() else [],
            "scrape_configs": [
                {"job_name": "kvmesh-watcher", "static_configs": [{"targets": watchers}]},
                {
                    "job_name": "kvmesh-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.worker_metrics_port}"]}],
                },
            ],
        }
        path = self.root / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.spawn(
            "prometheus",
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.root / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            kvmesh=False,
        )
        self.prometheus_url = f"http://127.0.0.1:{port}"

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, kvmesh: bool = True
    ) -> None:
        full_env = dict(os.environ, KVMESH_CONFIG=str(self.config), **(env or {}))
        full_env.pop("KVMESH_BROKER_URL", None)
        cmd = (
            [sys.executable, "-m", "pipeline", *args, "--config", str(self.config)]
            if kvmesh
            else args
        )
        self.supervisor.spawn(name, cmd, full_env)

    # -- watching ---------------------------------------------------------------------------

    def check_children(self) -> None:
        self.supervisor.check()

    @property
    def refresh_interval(self) -> float:
        """Seconds between looks at the mesh: each look reads about 15 figures of every
        (source, target) pair from the etcds, which on a small machine would compete with
        the sync itself in a large mesh; 1 s up to 20 pairs, longer beyond."""
        pairs = len(self.names) * (len(self.names) - 1)
        return max(1.0, pairs / 20)

    def refresh(self) -> None:
        """Update the per-source rows from the pair status and the watchers' metrics."""
        assert self.mesh_view is not None
        try:
            rows = self.mesh_view.status(exact=False)  # cheap counts: it runs every second
        except RetryableError:
            return
        for name, view in self.views.items():
            view.update(
                [r for r in rows if r.source == name], scrape(self.metrics_ports.get(name, 0))
            )

    def render(self, width: int = 140) -> Table:
        return render(
            list(self.views.values()),
            f"kvmesh lab: {len(self.names)} clusters, flower {self.flower_url} "
            f"({self.flower_user} / {self.flower_password})",
            width,
        )

    def line(self) -> str:
        return line(list(self.views.values()))

    # -- stopping ---------------------------------------------------------------------------

    def pause_churn(self) -> None:
        self.supervisor.signal("simulate-", signal.SIGUSR1)

    def converge(self) -> tuple[bool, list[str]]:
        assert self.settings is not None
        # converge_timeout counts from the last time the backlog shrank: a large mesh may
        # still be draining its queues when the churn stops, and that is progress
        deadline = time.monotonic() + self.opts.converge_timeout
        lines: list[str] = []
        backlog: int | None = None
        while True:
            self.check_children()
            assert self.mesh_view is not None
            try:
                equal, lines = self.mesh_view.verify(3)
                depth = sum(self.mesh_view.broker.depth(queue_name(n)) for n in self.names)
            except RetryableError as exc:
                equal, lines, depth = False, [str(exc)], None
            if depth is not None and (backlog is None or depth < backlog):
                backlog = depth
                deadline = max(deadline, time.monotonic() + self.opts.converge_timeout)
            if equal or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # poll interval while the mesh converges
        if equal:  # let the watchers record their progress, for a final view without lag
            settle = time.monotonic() + 5
            while time.monotonic() < settle:
                self.refresh()
                if all(v.lag_revisions == 0 for v in self.views.values()):
                    break
                time.sleep(0.5)  # poll interval while progress records catch up
        return equal, lines

    def report(self) -> str:
        """The field report's table: identity keys per cluster, and what each target caches
        of each source, by ID and by value key."""
        assert self.mesh_view is not None and self.settings is not None
        clients = {n: self.mesh_view.etcd(self.settings.cluster(n), "write") for n in self.names}
        base = b"cilium/state/identities/v1/"
        out = [f"{'cluster':<12} {'state/identities/v1':>20} {'.../id':>8} {'.../value':>10}"]
        for n, c in clients.items():
            out.append(
                f"{n:<12} {c.count(base):>20} {c.count(base + b'id/'):>8} "
                f"{c.count(base + b'value/'):>10}"
            )
        out.append("")
        out.append(f"{'target':<12} {'source':<12} {'cached .../id':>14} {'cached .../value':>17}")
        for target, c in clients.items():
            for source in self.names:
                if source == target:
                    continue
                cache = f"cilium/cache/identities/v1/{source}/".encode()
                out.append(
                    f"{target:<12} {source:<12} {c.count(cache + b'id/'):>14} "
                    f"{c.count(cache + b'value/'):>17}"
                )
        out.append("")
        out.append(
            "peak queue depth per source: "
            + ", ".join(f"{queue_name(v.source)}={v.peak_queue}" for v in self.views.values())
        )
        costs = [v.per_change for v in self.views.values()]
        if all(c is not None for c in costs) and costs:
            changes = sum(c[0] for c in costs if c)
            tasks = sum(c[0] * c[1] for c in costs if c) / changes
            size = sum(c[0] * c[2] for c in costs if c) / changes
            written = sum(c[0] * c[3] for c in costs if c) / changes
            out.append(
                f"broker cost per source change while churning: {tasks:.3f} tasks, "
                f"{size:.0f} bytes ({changes} changes); written to Redis with the messages' "
                f"envelopes: {written:.0f} bytes"
            )
        synced = [v.synced_time for v in self.views.values()]
        if synced and None not in synced and self.started_at is not None:
            out.append(
                "initial sync: every source in every target "
                f"{max(t for t in synced if t is not None) - self.started_at:.1f} s after the "
                "clusters were populated"
            )
        out.append(
            "peak lag (s) per source once its initial sync was in: "
            + ", ".join(
                f"{v.source}={'-' if v.peak_lag_seconds is None else f'{v.peak_lag_seconds:.1f}'}"
                for v in self.views.values()
            )
        )
        return "\n".join(out)

    def stop(self) -> None:
        """Stop every child and server; SIGKILL whatever does not stop in time."""
        if self.mesh_view is not None:
            self.mesh_view.close()
        self.supervisor.stop()
        if not self.opts.keep:
            shutil.rmtree(self.root, ignore_errors=True)


class StopRequest:
    """Ctrl-C or SIGTERM while the lab runs its mesh (see _signals_as).

    The first one only sets a flag that the loop looks at between looks at the mesh. A
    handler that raised KeyboardInterrupt wherever the main thread was could be dropped:
    raised inside a __del__ (a connection or channel collected during a look), Python prints
    it and carries on, and the lab would run its whole --duration. Nor may the handler take
    a lock, as threading.Event.set() does: the main thread may hold that very lock, inside
    Event.wait(), when the signal is handled. A second one raises KeyboardInterrupt, for a
    look at the mesh that hangs."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, _sig: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def wait(self, seconds: float) -> None:
        """Sleep up to *seconds*, less once a stop is requested (a tenth of a second)."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))


def _raise_keyboard(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM go to *handler* inside the block; the handlers of before after."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_lab(opts: LabOptions) -> int:
    """Run the lab; exit code 0 only if every pair converged."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: no terminal width to fit
    lab = Lab(opts, root=Path(opts.data_dir)) if opts.data_dir else Lab(opts)
    converged = False
    try:
        # SIGTERM stops the lab as Ctrl-C does; while the mesh runs, both are a request
        with _signals_as(_raise_keyboard):
            try:
                lab.start(say=console.print)
                started = time.monotonic()
                stop = StopRequest()
                with _signals_as(stop.handler), contextlib.ExitStack() as stack:
                    live = None
                    if console.is_terminal:
                        live = stack.enter_context(
                            Live(lab.render(console.width), console=console, refresh_per_second=2)
                        )
                    last_line = 0.0
                    while not stop.requested and (
                        not opts.duration or time.monotonic() - started < opts.duration
                    ):
                        lab.check_children()
                        lab.refresh()
                        if live is not None:
                            live.update(lab.render(console.width))
                        elif time.monotonic() - last_line >= 5:
                            console.print(lab.line())
                            last_line = time.monotonic()
                        stop.wait(lab.refresh_interval)
                if stop.requested:
                    console.print("lab: interrupted")
            except KeyboardInterrupt:
                console.print("lab: interrupted")
            if not lab.views:
                return 1
            console.print("lab: churn stopped; waiting for the mesh to converge")
            lab.refresh()
            for view in lab.views.values():
                view.mark_churn_end()
            lab.pause_churn()
            stopped = time.monotonic()
            converged, lines = lab.converge()
            took = time.monotonic() - stopped
            console.print(lab.render(console.width))
            console.print("\n".join(lines))
            console.print(lab.report())
            console.print(
                f"lab: {'converged' if converged else 'NOT converged'}"
                f"{f' {took:.1f} s after the churn stopped' if converged else ''}: "
                f"{'every' if converged else 'not every'} target cache equals "
                "its source"
            )
    except LabError as exc:
        console.print(f"lab: {exc}")
        converged = False
    except KeyboardInterrupt:
        console.print("lab: interrupted while stopping")
        converged = False
    finally:
        lab.stop()
    return 0 if converged else 1
