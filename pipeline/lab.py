"""`kvmesh lab`: a whole mesh on one machine, without Docker.

It starts N etcd clusters, Redis, one watcher per source cluster, a worker pool, Flower and a
simulator per cluster, all on loopback with their data under one temporary directory; shows a
live view per source cluster; and on Ctrl-C or at the end of --duration stops the churn, waits
for the mesh to converge and prints the final report. No process outlives it: children are
stopped on every exit path, and the kernel stops them should the lab itself be killed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .config import WRITE, Settings, load_settings, queue_name
from .errors import KvmeshError, RetryableError
from .etcd import Etcd
from .meshconfig import mesh_config, new_signing_key, write_secret
from .orphan import wrap
from .report import collect_status, verify_once
from .servers import EtcdServer, RedisServer, ServerProcess, free_port, start_all


class LabError(KvmeshError):
    pass


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


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class SourceView:
    """One row of the live view."""

    source: str
    queue: int | None = None
    peak_queue: int = 0
    lag_revisions: int | None = None
    lag_seconds: float | None = None
    synced_keys: int = 0
    ops_applied: int = 0
    rejected: int = 0
    events: int = 0
    targets_synced: int = 0
    targets: int = 0


@dataclass
class Lab:
    opts: LabOptions
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvmesh-lab-")))
    children: list[Child] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    views: dict[str, SourceView] = field(default_factory=dict)
    flower_url: str = ""
    flower_user: str = "admin"
    flower_password: str = ""
    config: Path = Path()
    settings: Settings | None = None

    # -- starting ---------------------------------------------------------------------------

    def start(self, say: Any = print) -> None:
        o = self.opts
        self.names = [f"cluster-{i + 1}" for i in range(o.clusters)]
        say(f"lab: data under {self.root}")
        # Redis with a password, and tasks signed with a key of the lab's own, as in any
        # real deployment: both live in files readable by the lab's user only
        redis = RedisServer(self.root / "redis", aof=True, password=secrets.token_urlsafe(16))
        etcds = [EtcdServer(self.root / name) for name in self.names]
        start_all([redis, *etcds])
        self.servers += [redis, *etcds]
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
        self.settings = load_settings(str(self.config), env={})
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
        self._wait_logs([f"simulate-{n}" for n in self.names], "populated", 120)
        say(f"lab: {o.clusters} simulated clusters populated ({o.identities} identities each)")
        self.spawn(
            "worker", ["worker", "--concurrency", str(o.workers), "--hostname", "lab-worker@%h"]
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
        self.views = {n: SourceView(n) for n in self.names}
        say(
            f"lab: flower on {self.flower_url} (user {self.flower_user}, "
            f"password {self.flower_password})"
        )

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
            "pipeline.flowerapp",
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

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, kvmesh: bool = True
    ) -> Child:
        log = self.root / f"{name}.log"
        full_env = dict(os.environ, KVMESH_CONFIG=str(self.config), **(env or {}))
        full_env.pop("KVMESH_BROKER_URL", None)
        cmd = (
            [sys.executable, "-m", "pipeline", *args, "--config", str(self.config)]
            if kvmesh
            else args
        )
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                wrap(cmd),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=self.root,
                # Its own session: a terminal's Ctrl-C reaches the lab alone, which then stops
                # the children in order. The kernel still stops them if the lab dies.
                start_new_session=True,
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def _wait_logs(self, names: list[str], text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            self.check_children()
            for child in self.children:
                if child.name in pending and text in child.tail(200):
                    pending.discard(child.name)
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {', '.join(sorted(pending))}")
            time.sleep(0.2)  # poll interval while children start

    # -- watching ---------------------------------------------------------------------------

    def check_children(self) -> None:
        """Raise LabError naming the first child that died, with the tail of its log."""
        for child in self.children:
            rc = child.popen.poll()
            if rc is not None:
                raise LabError(
                    f"{child.name} exited with code {rc}; last lines of "
                    f"{child.log}:\n{child.tail()}"
                )
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is not None:
                raise LabError(
                    f"{s.name} on port {s.port} exited with code "
                    f"{s.proc.returncode}; see {s.log_path}"
                )

    def refresh(self) -> None:
        """Update the per-source views from Redis, the targets and the watchers' metrics."""
        assert self.settings is not None
        try:
            rows = collect_status(self.settings)
        except RetryableError:
            return
        per: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            per.setdefault(r["source"], []).append(r)
        for name, view in self.views.items():
            pairs = per.get(name, [])
            if not pairs:
                continue
            view.queue = pairs[0]["queue"]
            view.peak_queue = max(view.peak_queue, view.queue or 0)
            lags = [p["lag_revisions"] for p in pairs]
            view.lag_revisions = None if None in lags else max(lags)
            seconds = [
                0.0 if p["lag_revisions"] == 0 else (p["progress_age_s"] or 0.0)
                for p in pairs
                if p["lag_revisions"] is not None
            ]
            view.lag_seconds = max(seconds) if seconds else None
            view.synced_keys = sum(p["cached_keys"] for p in pairs)
            view.ops_applied = sum(p["workers"].get("ops_applied", 0) for p in pairs)
            view.targets = len(pairs)
            view.targets_synced = sum(1 for p in pairs if p["canaries"] == 5)
            metrics = scrape(self.metrics_ports.get(name, 0))
            view.rejected = int(
                sum(v for k, v in metrics.items() if k.startswith("kvmesh_watcher_rejected_total"))
            )
            view.events = int(
                sum(v for k, v in metrics.items() if k.startswith("kvmesh_watcher_events_total"))
            )

    def render(self) -> Table:
        table = Table(
            title=f"kvmesh lab: {len(self.names)} clusters, flower {self.flower_url} "
            f"({self.flower_user} / {self.flower_password})"
        )
        for col in (
            "source",
            "queue",
            "peak",
            "lag rev",
            "lag s",
            "synced keys",
            "ops applied",
            "events",
            "filtered",
            "targets synced",
        ):
            table.add_column(col, justify="left" if col == "source" else "right")
        for v in self.views.values():
            table.add_row(
                v.source,
                _n(v.queue),
                str(v.peak_queue),
                _n(v.lag_revisions),
                _n(v.lag_seconds),
                str(v.synced_keys),
                str(v.ops_applied),
                str(v.events),
                str(v.rejected),
                f"{v.targets_synced}/{v.targets}",
            )
        return table

    def line(self) -> str:
        return "  ".join(
            f"{v.source}: queue={_n(v.queue)} lag={_n(v.lag_revisions)} synced={v.synced_keys}"
            for v in self.views.values()
        )

    # -- stopping ---------------------------------------------------------------------------

    def pause_churn(self) -> None:
        for child in self.children:
            if child.name.startswith("simulate-") and child.popen.poll() is None:
                child.popen.send_signal(signal.SIGUSR1)

    def converge(self) -> tuple[bool, list[str]]:
        assert self.settings is not None
        deadline = time.monotonic() + self.opts.converge_timeout
        lines: list[str] = []
        while True:
            self.check_children()
            try:
                equal, lines = verify_once(self.settings, 3)
            except RetryableError as exc:
                equal, lines = False, [str(exc)]
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
        base = b"cilium/state/identities/v1/"
        out = [f"{'cluster':<12} {'state/identities/v1':>20} {'.../id':>8} {'.../value':>10}"]
        clients = {n: self._client(n) for n in self.names}
        try:
            for n, c in clients.items():
                out.append(
                    f"{n:<12} {c.count(base):>20} {c.count(base + b'id/'):>8} "
                    f"{c.count(base + b'value/'):>10}"
                )
            out.append("")
            out.append(
                f"{'target':<12} {'source':<12} {'cached .../id':>14} {'cached .../value':>17}"
            )
            for target, c in clients.items():
                for source in self.names:
                    if source == target:
                        continue
                    cache = f"cilium/cache/identities/v1/{source}/".encode()
                    out.append(
                        f"{target:<12} {source:<12} {c.count(cache + b'id/'):>14} "
                        f"{c.count(cache + b'value/'):>17}"
                    )
        finally:
            for c in clients.values():
                c.close()
        out.append("")
        out.append(
            "peak queue depth per source: "
            + ", ".join(f"{queue_name(v.source)}={v.peak_queue}" for v in self.views.values())
        )
        return "\n".join(out)

    def _client(self, name: str) -> Etcd:
        assert self.settings is not None
        return Etcd(self.settings.cluster(name), timeout=10, role=WRITE)

    def stop(self) -> None:
        """Stop every child and server; SIGKILL whatever does not stop in time."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            if child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait(5)
        for s in self.servers:
            s.stop()
        if not self.opts.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def scrape(port: int) -> dict[str, float]:
    """Read a Prometheus text endpoint into {series: value} (empty when unreachable)."""
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[series] = float(value)
    return out


def _n(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


@contextlib.contextmanager
def _interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM stops the lab like Ctrl-C does."""

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_lab(opts: LabOptions) -> int:
    """Run the lab; exit code 0 only if every pair converged."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: no terminal width to fit
    lab = Lab(opts)
    converged = False
    try:
        with _interrupts_as_keyboard():
            try:
                lab.start(say=console.print)
                started = time.monotonic()
                interactive = console.is_terminal
                last_line = 0.0
                if interactive:
                    with Live(lab.render(), console=console, refresh_per_second=2) as live:
                        while not opts.duration or time.monotonic() - started < opts.duration:
                            lab.check_children()
                            lab.refresh()
                            live.update(lab.render())
                            time.sleep(1.0)  # refresh interval of the live view
                else:
                    while not opts.duration or time.monotonic() - started < opts.duration:
                        lab.check_children()
                        lab.refresh()
                        if time.monotonic() - last_line >= 5:
                            console.print(lab.line())
                            last_line = time.monotonic()
                        time.sleep(1.0)  # refresh interval of the status lines
            except KeyboardInterrupt:
                console.print("lab: interrupted")
            if not lab.views:
                return 1
            console.print("lab: churn stopped; waiting for the mesh to converge")
            lab.pause_churn()
            converged, lines = lab.converge()
            console.print(lab.render())
            console.print("\n".join(lines))
            console.print(lab.report())
            console.print(
                f"lab: {'converged' if converged else 'NOT converged'}: "
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
