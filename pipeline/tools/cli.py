"""The `kvmesh` command line."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pipeline.clients.etcd import Etcd
from pipeline.config import (
    READ,
    WRITE,
    ClusterConfig,
    Settings,
    check_concurrency,
    load_settings,
)
from pipeline.heap import settle_heap
from pipeline.protocol.errors import ConfigError, KvmeshError, RetryableError
from pipeline.protocol.layout import RESOURCES
from pipeline.protocol.logs import configure as configure_logging
from pipeline.protocol.names import queue_name
from pipeline.tools.report import collect_status, verify_kvstoremesh_once, verify_once

# Exit codes
EXIT_OK = 0
EXIT_NOT_EQUAL = 1  # verify found differences (or status found a pair not in sync)
EXIT_CONFIG = 2  # bad configuration or usage
EXIT_UNAVAILABLE = 3  # a store could not be reached
EXIT_FAILED = 4  # a watcher thread died: a bug; the supervisor should restart the process

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
  kvmesh keygen > /etc/kvmesh/signing.key          # then [broker] signing_key_file
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvmesh")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmesh",
        description="Sync Cilium cluster-mesh state between etcd clusters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kvmesh {_version()}")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    # the global flags are accepted after the subcommand too
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR"
    )
    subparsers = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:
        """add_parser with the common flags, and the help as description by default."""

        def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
            kw.setdefault("description", kw["help"][0].upper() + kw["help"][1:] + ".")
            return subparsers.add_parser(name, parents=[common], **kw)

    sub = _Sub()

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
    k.add_argument(
        "--concurrency", type=int, default=None, help="pool slots (default: worker.concurrency)"
    )
    k.add_argument(
        "--pool",
        choices=["prefork", "threads", "solo"],
        default=None,
        help="Celery pool (default: worker.pool)",
    )
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
    v.add_argument(
        "--against-kvstoremesh-layout",
        action="store_true",
        help="check that each target holds exactly what Cilium's KVStoreMesh would write "
        "(identities by ID only, its cluster config bytes, one RFC 3339 canary per resource), "
        "apart from timestamps and lease IDs",
    )
    c = with_config(sub.add_parser("count", help="count keys under a prefix in one cluster"))
    c.add_argument("--cluster", required=True, help="the cluster's name in the config")
    c.add_argument(
        "--role",
        choices=["auto", "read", "write"],
        default="auto",
        help="credentials to use: read (source side) or write (target side); auto takes "
        "read for cilium/state/ and cilium/synced/, write otherwise",
    )
    c.add_argument("prefix", help="key prefix, e.g. cilium/cache/identities/v1/")
    m = with_config(sub.add_parser("simulate", help="play one cluster's Cilium agents"))
    m.add_argument("--cluster", required=True, help="the cluster's name in the config")
    m.add_argument("--identities", type=int, default=1100, help="security identities")
    m.add_argument("--nodes", type=int, default=20, help="nodes")
    m.add_argument("--services", type=int, default=50, help="global services")
    m.add_argument(
        "--endpoints",
        type=int,
        default=None,
        help="pods, one ipcache entry each (default: 1.55 per identity, which "
        "gives about 1.5 value keys per identity as in the field report)",
    )
    m.add_argument("--churn", type=float, default=0.0, help="operations per second")
    m.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until stopped")
    m.add_argument(
        "--lease-ttl", type=int, default=60, help="seconds: the agents' lease on their keys"
    )
    m.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    m.add_argument("--no-populate", action="store_true", help="churn only, write no state")
    lab = sub.add_parser(
        "lab",
        help="run a whole mesh on this machine (no Docker)",
        description="Start N etcd clusters, Redis, watchers, workers, Flower "
        "and a simulator per cluster; show a live view; on Ctrl-C or after "
        "--duration stop the churn, wait for convergence and report.",
    )
    lab.add_argument("--clusters", type=int, default=3, help="clusters in the mesh")
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
    lab.add_argument(
        "--converge-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for an exact mesh after the churn, counted from the last "
        "time the queues shrank",
    )
    lab.add_argument("--keep", action="store_true", help="keep the lab's data directory")
    lab.add_argument(
        "--data-dir",
        default="",
        help="put the lab's data here (created; must be empty) instead of a temporary "
        "directory; removed at the end unless --keep",
    )
    lab.add_argument(
        "--prometheus",
        action="store_true",
        help="also start Prometheus (the `prometheus` binary on PATH) scraping every watcher "
        "and the worker, with deploy/prometheus/alerts.yml",
    )
    lab.add_argument(
        "--prometheus-port", type=int, default=0, help="its web port (default: a free port)"
    )
    f = with_config(
        sub.add_parser(
            "flower",
            help="run Flower (the Celery monitor) behind basic auth",
            description="Run Flower (`celery -A pipeline.tools.flowerapp flower`) for this mesh, "
            "but only behind basic auth: FLOWER_BASIC_AUTH (USER:PASSWORD, a password of 12 "
            "characters or more, not the example one) must be set in the environment. Whoever "
            "can log into Flower can send tasks; workers drop any that are not signed.",
        )
    )
    f.add_argument("--address", default="127.0.0.1", help="address to listen on")
    f.add_argument("--port", type=int, default=5555, help="port to listen on")
    sub.add_parser(
        "keygen",
        help="print a new task signing key",
        description="Print a new random key for [broker] signing_key_file. Put the new key "
        "on the first line to sign with it, and keep the old one below it until every queued "
        "task signed with it is gone.",
    )
    s = with_config(sub.add_parser("status", help="per-pair queue depth, lag and counts"))
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument(
        "--fast",
        action="store_true",
        help="leave out the expected and rejected key counts, which list every source key "
        "as verify does (for polling a large mesh)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(str(args.log_level))
    try:
        if args.command == "lab":
            return cmd_lab(args)
        if args.command == "keygen":
            from pipeline.tools.meshconfig import new_signing_key

            print(new_signing_key())
            return EXIT_OK
        # only the processes that sign or verify tasks read the signing keys
        settings = load_settings(args.config, keys=args.command in ("watch", "worker"))
        handler = {
            "watch": cmd_watch,
            "worker": cmd_worker,
            "verify": cmd_verify,
            "count": cmd_count,
            "simulate": cmd_simulate,
            "status": cmd_status,
            "flower": cmd_flower,
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


def _task_counter(metrics: Any, source: str) -> Any:
    tasks, size = metrics.tasks.labels(source), metrics.task_bytes.labels(source)
    written = metrics.broker_bytes.labels(source)

    def count(payload: int, wire: int) -> None:
        tasks.inc()
        size.inc(payload)
        written.inc(wire)

    return count


def check_metrics_port(settings: Settings, name: str) -> None:
    """ConfigError unless the metrics port *name* (watcher_port, worker_port) is off or can
    be bound now."""
    port, bind = getattr(settings.metrics, name), settings.metrics.bind
    if port:
        from pipeline.clients.metrics_http import can_bind

        problem = can_bind(port, bind)
        if problem is not None:
            raise ConfigError(f"metrics.{name}", f"cannot listen on {bind}:{port}: {problem}")


def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.clients.broker import redis_client
    from pipeline.clients.lease import RedisLease, lease_held
    from pipeline.clients.publisher import RedisPublisher
    from pipeline.protocol.wire import Signer
    from pipeline.source.metrics import WatcherMetrics
    from pipeline.source.watcher import Watcher

    names = args.source or [c.name for c in settings.sources]
    sources = [settings.cluster(n) for n in names]
    for c in sources:
        if not c.source:
            raise ConfigError(f"clusters[{c.name}].source", "is false; it cannot be watched")
        if not settings.targets_of(c.name):
            raise ConfigError("clusters", f"source {c.name} has no target cluster")
    settings.require_signing("kvmesh watch")
    if args.check:
        check_metrics_port(settings, "watcher_port")
        print(f"ok: would watch {', '.join(names)}")
        return EXIT_OK
    signer = Signer(settings.signing) if settings.signing else None
    metrics = WatcherMetrics()
    watchers: list[Watcher] = []

    def unready() -> str | None:
        if not watchers:
            return "starting"
        return "; ".join(r for r in (w.unready() for w in watchers) if r) or None

    if settings.metrics.watcher_port:
        try:
            metrics.serve(settings.metrics.watcher_port, settings.metrics.bind, unready)
        except OSError as exc:
            raise ConfigError(
                "metrics.watcher_port",
                f"cannot listen on {settings.metrics.bind}:{settings.metrics.watcher_port}: "
                f"{exc.strerror}",
            ) from None

    def watcher(c: ClusterConfig) -> Watcher:
        leases = redis_client(settings)  # the lease, and the drain's look at other leases
        return Watcher(
            settings,
            c,
            RedisPublisher(
                queue_name(c.name),
                redis_client(settings),
                signer,
                settings.sync.batches_per_task,
                on_task=_task_counter(metrics, c.name),
            ),
            metrics,
            lease=RedisLease(leases, c.name, settings.sync.leader_ttl),
            signer=signer,
            watched=functools.partial(lease_held, leases, ttl=settings.sync.leader_ttl),
        )

    watchers += [watcher(c) for c in sources]
    metrics.remote_clusters.set(len(watchers))

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        for w in watchers:
            w.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("watching %s", ", ".join(names))
    # what exists now (modules, clients, settings) lives as long as the process
    settle_heap()
    failed = run_watchers(watchers)
    if failed:
        print(f"kvmesh: the watcher of {', '.join(failed)} failed; see the log", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


class Runnable(Protocol):
    @property
    def name(self) -> str: ...

    def run(self) -> None: ...

    def stop(self) -> None: ...


def run_watchers(watchers: Sequence[Runnable]) -> list[str]:
    """Run each watcher on a thread until all have returned. If one fails, the others are
    stopped and its name returned: nothing that comes from input gets that far, so it is a
    bug, and the process must end for its supervisor to restart it, rather than run on
    without that source."""
    failed: list[str] = []

    def run(w: Runnable) -> None:
        try:
            w.run()
        except BaseException:
            log.exception("%s: the watcher failed", w.name)
            failed.append(w.name)
            for other in watchers:
                other.stop()

    threads = [
        threading.Thread(target=run, args=(w,), name=f"watcher:{w.name}", daemon=True)
        for w in watchers
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
    return failed


# -- worker ---------------------------------------------------------------------------------


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    known = [queue_name(c.name) for c in settings.sources]
    queues = args.queues or ",".join(known)
    unknown = [q for q in queues.split(",") if q not in known]
    if unknown:
        raise ConfigError(
            "--queues", f"{', '.join(unknown)} is no source's queue (known: {', '.join(known)})"
        )
    concurrency = settings.worker.concurrency if args.concurrency is None else args.concurrency
    pool = args.pool or settings.worker.pool
    if concurrency < 1 or pool != "solo":  # the solo pool ignores a --concurrency over 1
        check_concurrency("--concurrency", concurrency)
    if pool == "solo":
        # the solo pool runs each task in the worker's main process, one at a time: more
        # slots are more workers (replicas). worker.concurrency does not apply to it (its
        # default, 2, would otherwise warn at every start); a --concurrency asked for on
        # the command line is said not to, not refused: a compose file or a lab that passes
        # its usual one keeps working when the pool is set to solo
        if args.concurrency not in (None, 1):
            log.warning(
                "the solo pool has one slot: --concurrency %d does not apply (run more "
                "workers for more slots)",
                args.concurrency,
            )
        concurrency = 1
    settings.require_signing("kvmesh worker")
    check_metrics_port(settings, "worker_port")
    if args.check:
        slots = f"{concurrency} slot" + ("s" if concurrency != 1 else "")
        print(f"ok: would consume {queues} with {slots} ({pool} pool)")
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
    """Run the Celery worker as a child and start it again whenever it ends, unless this
    process stopped it: Celery gives up on some broker reconnections ("Unrecoverable
    error"), and anyone who can write to Redis can send it a remote `shutdown`, which ends it
    with code 0. SIGTERM and SIGINT are passed on, and then the child is not restarted."""
    import os
    import subprocess

    from pipeline.tools.orphan import wrap

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
        if stopping.is_set():
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
            check = verify_kvstoremesh_once if args.against_kvstoremesh_layout else verify_once
            equal, lines = check(settings, args.examples)
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
    role = args.role
    if role == "auto":  # a source's own state with the read credentials, the rest with write
        role = READ if args.prefix.startswith(("cilium/state/", "cilium/synced/")) else WRITE
    etcd = Etcd(cluster, settings.sync.etcd_timeout, role)
    try:
        print(etcd.count(args.prefix.encode()))
    finally:
        etcd.close()
    return EXIT_OK


# -- lab ------------------------------------------------------------------------------------


def cmd_lab(args: argparse.Namespace) -> int:
    from pipeline.tools.lab import LabOptions, run_lab

    if not 2 <= args.clusters <= 16:
        raise ConfigError("--clusters", "must be from 2 to 16")
    if args.prometheus and shutil.which("prometheus") is None:
        raise ConfigError(
            "--prometheus", "no prometheus binary on PATH (apt-get install prometheus)"
        )
    check_concurrency("--workers", args.workers)
    if args.workers < 1 or args.identities < 1 or args.churn < 0 or args.duration < 0:
        raise ConfigError(
            "--workers",
            "--workers and --identities must be positive, --churn and --duration not negative",
        )
    if args.data_dir:
        try:
            Path(args.data_dir).mkdir(parents=True, exist_ok=True)
            empty = not any(Path(args.data_dir).iterdir())
        except OSError as exc:
            raise ConfigError("--data-dir", exc.strerror or str(exc)) from None
        if not empty:
            raise ConfigError("--data-dir", "must be empty")
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
            data_dir=args.data_dir,
            prometheus=args.prometheus,
            prometheus_port=args.prometheus_port,
        )
    )


# -- simulate -------------------------------------------------------------------------------


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.tools.simulate import Simulator

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


# -- flower ---------------------------------------------------------------------------------

EXAMPLE_FLOWER_PASSWORDS = {"change-me", "changeme", "admin", "password", "flower"}


def cmd_flower(settings: Settings, args: argparse.Namespace) -> int:
    import os

    auth = os.environ.get("FLOWER_BASIC_AUTH", "")
    for pair in auth.split(","):
        user, sep, password = pair.partition(":")
        if not auth or not sep or not user:
            raise ConfigError("FLOWER_BASIC_AUTH", "must be set to USER:PASSWORD")
        if password in EXAMPLE_FLOWER_PASSWORDS or len(password) < 12:
            raise ConfigError(
                "FLOWER_BASIC_AUTH",
                f"the password of {user} is an example or shorter than 12 characters; "
                "generate one (python3 scripts/compose-secrets does)",
            )
    if not 1 <= args.port <= 65535:
        raise ConfigError("--port", f"{args.port} is not a TCP port")
    if args.check:
        print(f"ok: would run Flower on {args.address}:{args.port} behind basic auth")
        return EXIT_OK
    env = dict(os.environ)
    if args.config:
        env["KVMESH_CONFIG"] = os.path.abspath(args.config)
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "pipeline.tools.flowerapp",
        "flower",
        f"--address={args.address}",
        f"--port={args.port}",
    ]
    os.execvpe(cmd[0], cmd, env)  # noqa: S606 - our own command line, no shell


# -- status ---------------------------------------------------------------------------------


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if args.check:
        print("ok")
        return EXIT_OK
    rows = collect_status(settings, exact=not args.fast)
    # every store answered (else collect_status raised); the broker may not have
    code = EXIT_UNAVAILABLE if any(r.queue is None for r in rows) else EXIT_OK
    if code:
        print(
            f"kvmesh: cannot reach the broker at {broker_address(settings.broker.url)}; "
            "queue depths and worker outcomes are unknown",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return code
    canaries = sum(1 for r in RESOURCES if r.canary)
    header = (
        f"{'source':<14} {'target':<14} {'queue':>6} {'src rev':>9} {'applied':>9} "
        f"{'lag':>6} {'canaries':>8} {'cached':>9} {'of':>9} {'rejected':>8}  worker outcomes"
    )
    print(header)
    for r in rows:
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(r.workers.items()))
        print(
            f"{r.source:<14} {r.target:<14} {_n(r.queue):>6} "
            f"{r.source_revision:>9} {r.applied_revision:>9} {_n(r.lag_revisions):>6} "
            f"{r.canaries:>6}/{canaries} {r.cached_keys:>9} {_n(r.expected_keys):>9} "
            f"{_n(r.rejected_keys):>8}  "
            f"{outcomes}"
        )
        if r.waiting_for_source_canary:
            print(f"    waiting for source canary: {', '.join(r.waiting_for_source_canary)}")
    return code


def broker_address(url: str) -> str:
    """scheme://host:port/db of a broker URL, and nothing else of it: never its user, its
    password or what a malformed URL might carry in its path."""
    import re
    from urllib.parse import urlsplit

    first = url.split(";", 1)[0]  # a Sentinel URL lists several
    try:
        parts = urlsplit(first)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(the configured broker URL)"
    if not re.fullmatch(r"[A-Za-z0-9.\-]+|[0-9a-fA-F:]+", host):
        return "(the configured broker URL)"
    db = parts.path if re.fullmatch(r"/\d{1,3}", parts.path) else ""
    more = " (and others)" if ";" in url else ""
    return f"{parts.scheme}://{host}{port}{db}{more}"


def _n(v: Any) -> str:
    return "-" if v is None else str(v)
