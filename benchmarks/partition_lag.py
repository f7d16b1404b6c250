"""Does a target that drops packets hold up the other targets of its source?

    python benchmarks/partition_lag.py [--keys 1000] [--rate 100] [--seconds 60]
        [--concurrency 2] [--sync KEY=VALUE]... [--json FILE]

One source (cluster-a) and two targets: cluster-b, reached directly, and cluster-c, reached
through a TCP proxy (tests/proxy.py) that can blackhole the link: accept connections, hold
them and drop every byte, as a network partition looks to both ends. A call to cluster-c
then waits for its deadline (`sync.etcd_timeout`, 10 s by default) or fails at once,
depending on what gRPC's channel is doing (a connection that went silent or one being
made waits; one that failed recently fails fast). Two partitions:

1. **From before the watcher's start.** Timed: cluster-b's initial sync, from the watcher's
   start until cluster-b holds every key (what the start spent on the target that does not
   answer); then the proxy heals, and the time until cluster-c holds every key.
2. **Of the connections in use.** The proxy blackholes again, and the source's cluster
   config changes what is synced (it starts advertising `serviceExportsEnabled`), which owes
   every target a resync: cluster-b gets it, cluster-c is tried while the partition lasts.
   Meanwhile `--rate` puts a second go into the source for `--seconds`, each timed from its
   send until a watch on cluster-b saw it (as `lag.py` times them): p50, p99 and the longest
   delay, and the puts that never came or came out of order. Then the proxy heals, and the
   time until cluster-c holds every key with the source's last value is taken.

Run it on two checkouts (the script copied into the older one) to compare products: the
figures are those of the checkout the script is in (benchcommon.ROOT).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchcommon import (
    CACHE_PREFIX,
    ID_PREFIX,
    ROOT,
    SOURCE,
    Watched,
    add_sync_option,
    byte_compile,
    discard,
    pair_config,
    spawn,
    stop,
    sync_settings,
    wait_for,
    worker_command,
    workers_ready,
    write_json,
)
from lag import SEQ, Arrivals, churn, judge, key_of, lost_keys

from pipeline.clients.etcd import Etcd
from pipeline.tools.cilium_state import (
    cluster_config_value,
    identity_labels,
    source_canaries,
    write_items,
)
from pipeline.tools.servers import EtcdServer, RedisServer
from tests.proxy import Proxy


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=100, help="puts a second into the source")
    ap.add_argument("--seconds", type=float, default=60.0, help="of churn during the partition")
    ap.add_argument("--concurrency", type=int, default=2, help="kvmesh worker pool slots")
    add_sync_option(ap, "etcd_timeout=5")
    ap.add_argument("--json", default="", help="write the results to this file")
    args = ap.parse_args()
    byte_compile()
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-partition-"))
    print(f"logs in {tmp}", flush=True)
    servers: list[Watched] = []
    procs: list[subprocess.Popen[bytes]] = []
    src, dst_b, dst_c = (EtcdServer(tmp / n) for n in ("source", "target-b", "target-c"))
    broker = RedisServer(tmp / "redis")
    proxy: Proxy | None = None
    stream = None
    try:
        for s in (src, dst_b, dst_c, broker):
            s.start()
            servers.append(s)
        config_key = f"cilium/cluster-config/{SOURCE}".encode()
        source = Etcd(src.cluster())
        # a source with its cluster config and synced canaries, as a clustermesh-apiserver
        # writes them (without a config, a watcher waits for every target before it starts)
        write_items(
            source,
            itertools.chain(
                (
                    (ID_PREFIX + key_of(i), identity_labels(SOURCE, i).encode() + SEQ + b"-1")
                    for i in range(args.keys)
                ),
                [(config_key, cluster_config_value(1))],
                source_canaries(SOURCE).items(),
            ),
        )
        source.close()
        proxy = Proxy(dst_c.port)
        proxy.blackhole()  # 1: from before the watcher's start
        cfg = pair_config(
            tmp / "mesh.toml",
            broker.url,
            src.url,
            dst_b.url,
            sync_settings(args.sync),
            more_targets=[("cluster-c", proxy.url)],
        )
        spawn(procs, worker_command(cfg, args.concurrency, "prefork"), tmp / "worker.log")
        wait_for(
            "the workers",
            lambda: workers_ready(tmp / "worker.log", "prefork", args.concurrency),
            60,
            tmp / "worker.log",
            [*procs, *servers],
        )
        b, c = Etcd(dst_b.cluster()), Etcd(dst_c.cluster())
        spawn(
            procs,
            [sys.executable, "-m", "pipeline", "watch", "--config", str(cfg)],
            tmp / "watch.log",
        )

        def seconds_until(what: str, done: Callable[[], bool], timeout: float) -> float:
            """How long until *done* (wait_for: a failed process or the timeout raise)."""
            began = time.monotonic()
            wait_for(what, done, timeout, tmp / "watch.log", [*procs, *servers])
            return time.monotonic() - began

        def holds_all(etcd: Etcd) -> Callable[[], bool]:
            return lambda: etcd.count(CACHE_PREFIX) >= args.keys

        b_initial = seconds_until("cluster-b's initial sync", holds_all(b), 120)
        proxy.heal()
        c_initial = seconds_until("cluster-c's initial sync", holds_all(c), 300)
        # 2: the connections in use go silent, and every target is owed a resync
        proxy.blackhole()
        arrivals = Arrivals()
        stream = b.watch(CACHE_PREFIX, b.revision() + 1, arrivals.on_events, arrivals.on_error)
        source = Etcd(src.cluster())
        config = json.loads(cluster_config_value(1))
        config["capabilities"]["serviceExportsEnabled"] = True  # what is synced changes
        source.put(config_key, json.dumps(config, separators=(",", ":")).encode())
        source.close()
        count = int(args.rate * args.seconds)
        sent, elapsed = churn(src, args.rate, count, 0, args.keys)
        last = {i: seq for seq, i, _ in sent}

        def holds_last(etcd: Etcd) -> bool:
            return lost_keys(etcd.items(CACHE_PREFIX), last) == 0

        seconds_until("cluster-b's last puts", lambda: holds_last(b), 60)
        r: dict[str, Any] = judge(arrivals, sent, args.keys, range(count))
        r.pop("trace")
        proxy.heal()
        c_after = seconds_until("cluster-c's cache", lambda: holds_last(c), 300)
        r.update(
            rate=args.rate,
            achieved=round(len(sent) / max(elapsed, 1e-9)),
            seconds=args.seconds,
            keys=args.keys,
            sync=sync_settings(args.sync),
            b_initial_sync_s=round(b_initial, 2),
            c_initial_sync_after_heal_s=round(c_initial, 2),
            c_synced_after_heal_s=round(c_after, 2),
            watch_errors=arrivals.errors[:3],
        )
        print(
            f"1. partitioned from the start: cluster-b's initial sync "
            f"{r['b_initial_sync_s']} s after the watcher's start; cluster-c's "
            f"{r['c_initial_sync_after_heal_s']} s after the partition healed\n"
            f"2. partitioned in use, every target owed a resync: cluster-b's lag p50 "
            f"{r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms over {r['puts']} "
            f"puts ({r['achieved']}/s), {r['not_arrived']} not arrived, "
            f"{r['reordered_keys']} keys reordered; cluster-c synced "
            f"{r['c_synced_after_heal_s']} s after the partition healed (product "
            f"{ROOT.name})",
            flush=True,
        )
        if args.json:
            write_json([r], args.json)
        return 0
    finally:
        if stream is not None:
            stream.stop()
        stop(procs)
        if proxy is not None:
            proxy.close()
        discard(*servers)


if __name__ == "__main__":
    sys.exit(main())
