"""The `kvmesh` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .config import Settings, load_settings, queue_name
from .errors import ConfigError, KvmeshError, RetryableError
from .etcd import Etcd
from .layout import RESOURCES
from .report import collect_status, verify_once

# Exit codes
EXIT_OK = 0
EXIT_NOT_EQUAL = 1  # verify found differences (or status found a pair not in sync)
EXIT_CONFIG = 2  # bad configuration or usage
EXIT_UNAVAILABLE = 3  # a store could not be reached

log = logging.getLogger("kvmesh")

EPILOG = """examples:
  kvmesh lab                                        # a 3-cluster mesh on this machine, 60 s
  kvmesh lab --clusters 2 --duration 0              # run until Ctrl-C
  kvmesh watch  --config mesh.toml                  # one watcher per source cluster
  kvmesh watch  --config mesh.toml --source cluster-a
  kvmesh worker --config mesh.toml --concurrency 4  # consume every source queue
  kvmesh verify --config mesh.toml --wait 60        # exit 0 once every cache is exact
  kvmesh count  --config mesh.toml --cluster cluster-b cilium/cache/identities/v1/
  kvmesh status --config mesh.toml
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmesh",
        description="Sync Cilium cluster-mesh state between etcd clusters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="TOML config file (default: $KVMESH_CONFIG)")
        sp.add_argument(
            "--check", action="store_true", help="validate the config and the arguments, then exit"
        )
        return sp

    w = with_config(sub.add_parser("watch", help="run the watcher of one or more sources"))
    w.add_argument(
        "--source",
        action="append",
        default=[],
        help="source cluster to watch (repeatable; default: every source)",
    )
    k = with_config(sub.add_parser("worker", help="run a Celery worker applying batches"))
    k.add_argument("--concurrency", type=int, default=None)
    k.add_argument("--pool", choices=["prefork", "threads", "solo"], default=None)
    k.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues (default: kvmesh.<source> for every source)",
    )
    k.add_argument("--hostname", default=None, help="Celery node name")
    v = with_config(sub.add_parser("verify", help="compare every target cache with its source"))
    v.add_argument(
        "--wait", type=float, default=0.0, help="poll until equal or until this many seconds passed"
    )
    v.add_argument("--examples", type=int, default=3, help="example keys shown per kind")
    c = with_config(sub.add_parser("count", help="count keys under a prefix in one cluster"))
    c.add_argument("--cluster", required=True)
    c.add_argument("prefix")
    m = with_config(sub.add_parser("simulate", help="play one cluster's Cilium agents"))
    m.add_argument("--cluster", required=True)
    m.add_argument("--identities", type=int, default=1100)
    m.add_argument("--nodes", type=int, default=20)
    m.add_argument("--services", type=int, default=50)
    m.add_argument(
        "--endpoints",
        type=int,
        default=None,
        help="pods, one ipcache entry each (default: 1.55 per identity, which "
        "gives about 1.5 value keys per identity as in the field report)",
    )
    m.add_argument("--churn", type=float, default=0.0, help="operations per second")
    m.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until stopped")
    m.add_argument("--lease-ttl", type=int, default=60)
    m.add_argument("--seed", type=int, default=None)
    m.add_argument("--no-populate", action="store_true", help="churn only, write no state")
    lab = sub.add_parser(
        "lab",
        help="run a whole mesh on this machine (no Docker)",
        description="Start N etcd clusters, Redis, watchers, workers, Flower "
        "and a simulator per cluster; show a live view; on Ctrl-C or after "
        "--duration stop the churn, wait for convergence and report.",
    )
    lab.add_argument("--clusters", type=int, default=3)
    lab.add_argument("--identities", type=int, default=1100, help="per cluster")
    lab.add_argument("--churn", type=float, default=20.0, help="operations/s per cluster")
    lab.add_argument("--workers", type=int, default=2, help="worker processes")
    lab.add_argument("--duration", type=float, default=60.0, help="seconds; 0: until Ctrl-C")
    lab.add_argument("--flower-port", type=int, default=0, help="default: a free port")
    lab.add_argument("--flower-auth", default="", help="USER:PASS (default: admin, random)")
    lab.add_argument(
        "--sync-identities",
        choices=["id", "all"],
        default="id",
        help='"all" also copies identity value keys (the pre-fix behaviour)',
    )
    lab.add_argument("--converge-timeout", type=float, default=120.0)
    lab.add_argument("--keep", action="store_true", help="keep the lab's data directory")
    s = with_config(sub.add_parser("status", help="per-pair queue depth, lag and counts"))
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "lab":
            return cmd_lab(args)
        settings = load_settings(args.config)
        handler = {
            "watch": cmd_watch,
            "worker": cmd_worker,
            "verify": cmd_verify,
            "count": cmd_count,
            "simulate": cmd_simulate,
            "status": cmd_status,
        }[args.command]
        return handler(settings, args)
    except ConfigError as exc:
        print(f"kvmesh: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RetryableError as exc:
        print(f"kvmesh: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KvmeshError as exc:
        print(f"kvmesh: {exc}", file=sys.stderr)
        return EXIT_NOT_EQUAL


# -- watch ----------------------------------------------------------------------------------


def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    from .celery_app import create_app
    from .leader import RedisLease
    from .metrics import WatcherMetrics
    from .publisher import CeleryPublisher
    from .watcher import Watcher

    names = args.source or [c.name for c in settings.sources]
    sources = [settings.cluster(n) for n in names]
    for c in sources:
        if not c.source:
            raise ConfigError(f"clusters[{c.name}].source", "is false; it cannot be watched")
        if not settings.targets_of(c.name):
            raise ConfigError("clusters", f"source {c.name} has no target cluster")
    if args.check:
        print(f"ok: would watch {', '.join(names)}")
        return EXIT_OK
    app = create_app(settings)
    metrics = WatcherMetrics()
    if settings.metrics.watcher_port:
        metrics.serve(settings.metrics.watcher_port, settings.metrics.bind)
    watchers = [
        Watcher(
            settings,
            c,
            CeleryPublisher(
                app, queue_name(c.name), settings.broker.url, settings.sync.batches_per_task
            ),
            metrics,
            lease=RedisLease(settings.broker.url, c.name, settings.sync.leader_ttl),
        )
        for c in sources
    ]
    threads = [
        threading.Thread(target=w.run, name=f"watcher:{w.source.name}", daemon=True)
        for w in watchers
    ]

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        for w in watchers:
            w.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for t in threads:
        t.start()
    log.info("watching %s", ", ".join(names))
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
    return EXIT_OK


# -- worker ---------------------------------------------------------------------------------


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    queues = args.queues or ",".join(queue_name(c.name) for c in settings.sources)
    concurrency = args.concurrency or settings.worker.concurrency
    pool = args.pool or settings.worker.pool
    if concurrency < 1:
        raise ConfigError("--concurrency", "must be at least 1")
    if args.check:
        print(f"ok: would consume {queues} with {concurrency} {pool} processes")
        return EXIT_OK
    hostname = args.hostname or f"kvmesh@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--hostname",
        hostname,
        "--loglevel",
        args.log_level,
        "--without-mingle",
        "--without-gossip",
    ]
    return supervise_worker(argv, args.config)


def supervise_worker(argv: list[str], config: str | None) -> int:
    """Run the Celery worker as a child and start it again if it dies on its own: Celery
    gives up on some broker reconnections ("Unrecoverable error") and the pool must outlive
    a Redis restart. SIGTERM and SIGINT are passed on, and then the child is not restarted."""
    import os
    import subprocess

    from .orphan import wrap

    env = dict(os.environ)
    if config:
        env["KVMESH_CONFIG"] = os.path.abspath(config)
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", *argv]
    stopping = threading.Event()
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.set()
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = 1.0
    while True:
        started = time.monotonic()
        proc = subprocess.Popen(wrap(cmd), env=env)
        child[:] = [proc]
        code = proc.wait()
        if stopping.is_set() or code == 0:
            return EXIT_OK if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
        log.error("celery worker exited with code %s; starting it again in %.0fs", code, backoff)
        if stopping.wait(backoff):
            return EXIT_OK


# -- verify ---------------------------------------------------------------------------------


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    if args.check:
        print("ok")
        return EXIT_OK
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            equal, lines = verify_once(settings, args.examples)
        except RetryableError as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("verify: %s; retrying", exc)
            time.sleep(0.5)  # poll interval of --wait
            continue
        if equal or time.monotonic() >= deadline:
            print("\n".join(lines))
            return EXIT_OK if equal else EXIT_NOT_EQUAL
        time.sleep(0.5)  # poll interval of --wait


# -- count ----------------------------------------------------------------------------------


def cmd_count(settings: Settings, args: argparse.Namespace) -> int:
    cluster = settings.cluster(args.cluster)
    if args.check:
        print("ok")
        return EXIT_OK
    etcd = Etcd(cluster, settings.sync.etcd_timeout)
    try:
        print(etcd.count(args.prefix.encode()))
    finally:
        etcd.close()
    return EXIT_OK


# -- lab ------------------------------------------------------------------------------------


def cmd_lab(args: argparse.Namespace) -> int:
    from .lab import LabOptions, run_lab

    if not 2 <= args.clusters <= 16:
        raise ConfigError("--clusters", "must be from 2 to 16")
    if args.workers < 1 or args.identities < 1 or args.churn < 0 or args.duration < 0:
        raise ConfigError(
            "--workers",
            "--workers and --identities must be positive, --churn and --duration not negative",
        )
    return run_lab(
        LabOptions(
            clusters=args.clusters,
            identities=args.identities,
            churn=args.churn,
            workers=args.workers,
            duration=args.duration,
            flower_port=args.flower_port,
            flower_auth=args.flower_auth,
            identities_mode=args.sync_identities,
            converge_timeout=args.converge_timeout,
            keep=args.keep,
        )
    )


# -- simulate -------------------------------------------------------------------------------


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from .simulate import Simulator

    cluster = settings.cluster(args.cluster)
    if args.endpoints is None:
        args.endpoints = round(args.identities * 1.55)
    for name in ("identities", "nodes", "services", "endpoints", "lease_ttl"):
        if getattr(args, name) < (1 if name in ("nodes", "lease_ttl") else 0):
            raise ConfigError(f"--{name.replace('_', '-')}", "is out of range")
    if args.churn < 0 or args.duration < 0:
        raise ConfigError("--churn", "and --duration must not be negative")
    if args.check:
        print(
            f"ok: would simulate {cluster.name} ({args.identities} identities, {args.churn} ops/s)"
        )
        return EXIT_OK
    sim = Simulator(
        cluster,
        identities=args.identities,
        nodes=args.nodes,
        services=args.services,
        endpoints=args.endpoints,
        lease_ttl=args.lease_ttl,
        seed=args.seed,
    )
    signal.signal(signal.SIGTERM, lambda *_: sim.stop())
    signal.signal(signal.SIGINT, lambda *_: sim.stop())
    signal.signal(signal.SIGUSR1, lambda *_: sim.pause())  # stop churning, keep the leases
    if not args.no_populate:
        sim.populate()
    print(f"simulate: {cluster.name} populated", flush=True)
    sim.run(args.churn, args.duration)
    print(f"simulate: {cluster.name} stopped after {sim.ops} operations", flush=True)
    return EXIT_OK


# -- status ---------------------------------------------------------------------------------


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if args.check:
        print("ok")
        return EXIT_OK
    rows = collect_status(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    canaries = sum(1 for r in RESOURCES if r.canary)
    header = (
        f"{'source':<14} {'target':<14} {'queue':>6} {'src rev':>9} {'applied':>9} "
        f"{'lag':>6} {'canaries':>8} {'src keys':>9} {'cached':>9}  worker outcomes"
    )
    print(header)
    for r in rows:
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(r["workers"].items()))
        print(
            f"{r['source']:<14} {r['target']:<14} {_n(r['queue']):>6} "
            f"{r['source_revision']:>9} {r['applied_revision']:>9} {_n(r['lag_revisions']):>6} "
            f"{r['canaries']:>6}/{canaries} {r['source_keys']:>9} {r['cached_keys']:>9}  "
            f"{outcomes}"
        )
    return EXIT_OK


def _n(v: Any) -> str:
    return "-" if v is None else str(v)
