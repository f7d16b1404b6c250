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
from .layout import RESOURCES, Layout, canary_key, progress_key
from .snapshot import diff, read_source, read_target

# Exit codes
EXIT_OK = 0
EXIT_NOT_EQUAL = 1  # verify found differences (or status found a pair not in sync)
EXIT_CONFIG = 2  # bad configuration or usage
EXIT_UNAVAILABLE = 3  # a store could not be reached

log = logging.getLogger("kvmesh")

EPILOG = """examples:
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
        settings = load_settings(args.config)
        handler = {
            "watch": cmd_watch,
            "worker": cmd_worker,
            "verify": cmd_verify,
            "count": cmd_count,
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
    from workers.tasks import create_worker_app

    queues = args.queues or ",".join(queue_name(c.name) for c in settings.sources)
    concurrency = args.concurrency or settings.worker.concurrency
    pool = args.pool or settings.worker.pool
    if concurrency < 1:
        raise ConfigError("--concurrency", "must be at least 1")
    if args.check:
        print(f"ok: would consume {queues} with {concurrency} {pool} processes")
        return EXIT_OK
    app = create_worker_app(settings)
    hostname = args.hostname or f"kvmesh@{socket.gethostname()}"
    app.worker_main(
        argv=[
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
    )
    return EXIT_OK


# -- verify ---------------------------------------------------------------------------------


def _show(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def verify_once(settings: Settings, examples: int) -> tuple[bool, list[str]]:
    lines: list[str] = []
    all_equal = True
    for src in settings.sources:
        targets = settings.targets_of(src.name)
        if not targets:
            continue
        source = Etcd(src, settings.sync.etcd_timeout)
        try:
            state = read_source(
                source,
                Layout(src.name, src.id, settings.sync.identities),
                page=settings.sync.page_size,
                max_bytes=settings.sync.max_batch_bytes,
            )
        finally:
            source.close()
        for tgt in targets:
            target = Etcd(tgt, settings.sync.etcd_timeout)
            try:
                d = diff(state.items, read_target(target, src.name, page=settings.sync.page_size))
            finally:
                target.close()
            head = f"{src.name} -> {tgt.name}:"
            summary = (
                f"{len(state.items)} keys, missing {len(d.missing)}, "
                f"extra {len(d.extra)}, different {len(d.different)}, "
                f"rejected {len(state.rejected)}"
            )
            lines.append(f"{head} {'EQUAL' if d.equal else 'DIFFERENT'}: {summary}")
            for kind, keys in (
                ("missing", sorted(d.missing)),
                ("extra", d.extra),
                ("different", sorted(d.different)),
            ):
                for key in keys[:examples]:
                    lines.append(f"    {kind}: {_show(key)}")
            for _key, reason in sorted(state.rejected.items())[:examples]:
                lines.append(f"    rejected: {reason}")
            all_equal = all_equal and d.equal
    return all_equal, lines


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


# -- status ---------------------------------------------------------------------------------


def collect_status(settings: Settings) -> list[dict[str, Any]]:
    import redis

    from .publisher import queue_depth

    rows: list[dict[str, Any]] = []
    r = redis.Redis.from_url(settings.broker.url, socket_timeout=5)
    for src in settings.sources:
        try:
            depth: int | None = queue_depth(r, queue_name(src.name))
        except redis.RedisError:
            depth = None
        source = Etcd(src, settings.sync.etcd_timeout)
        try:
            layout = Layout(src.name, src.id, settings.sync.identities)
            base = {
                "source": src.name,
                "queue": depth,
                "source_revision": source.revision(),
                "source_keys": sum(
                    source.count(res.source_prefix(src.name, layout.identities))
                    for res in RESOURCES
                    if not res.single_key
                ),
            }
            for tgt in settings.targets_of(src.name):
                target = Etcd(tgt, settings.sync.etcd_timeout)
                try:
                    row = {**base, "target": tgt.name, **_target_status(source, layout, target)}
                finally:
                    target.close()
                try:
                    stats = r.hgetall(f"kvmesh:stats:{src.name}:{tgt.name}")
                    row["workers"] = {_text(k): int(v) for k, v in stats.items()}
                except redis.RedisError:
                    row["workers"] = {}
                rows.append(row)
        finally:
            source.close()
    return rows


def _target_status(source: Etcd, layout: Layout, target: Etcd) -> dict[str, Any]:
    src = layout.source
    pkv = target.get(progress_key(src))
    progress = json.loads(pkv.value) if pkv else {}
    applied = int(progress.get("rev", 0))
    lag = None
    if pkv:
        # Only revisions that put a synced key count: in a mesh the source etcd is also a
        # target, and kvmesh's own writes there move its revision without anything to sync.
        newest = max(
            source.latest_change(
                res.source_prefix(src, layout.identities), applied, exact=res.single_key
            )
            for res in RESOURCES
        )
        lag = max(0, newest - applied)
    return {
        "applied_revision": applied,
        "lag_revisions": lag,
        "progress_age_s": round(time.time() - float(progress["ts"]), 1) if pkv else None,
        "canaries": sum(
            1 for res in RESOURCES if res.canary and target.get(canary_key(src, res)) is not None
        ),
        "cached_keys": sum(
            target.count(res.cache_scan_prefix(src)) for res in RESOURCES if not res.single_key
        ),
    }


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


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
