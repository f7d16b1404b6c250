"""Initial sync of N identity ID keys from one etcd to another: kvmesh against
`etcdctl make-mirror`, in the same run, on the same machine.

    python benchmarks/initial_sync.py [--keys 50000] [--concurrency 2] [--repeat 1]
        [--pool prefork] [--sync KEY=VALUE]... [--skip-mirror] [--nodes 0] [--json FILE]

With `--pool solo`, `--concurrency` solo workers run side by side (before 99919b8, one
solo worker, whatever the concurrency).

Each contender gets a fresh, empty target etcd. kvmesh's worker is started and ready
before the clock starts (as in a running mesh); the clock then covers the watcher's start,
its listing, the diff, the publishing and the workers applying every key. make-mirror's clock
covers the copy of every key. Both end when the target holds N keys under the cache prefix
(kvmesh's per-resource canaries, printed too, come up to a fence poll later).

Counting 50,000 keys costs the target etcd about 4 ms of CPU; counted every 20 ms, the
target of either contender spent a tenth of a core on it, and make-mirror took 8-10% longer
(17.2-17.6 s against 18.8-19.7 s in one comparison). So each target is counted only once a
cheap signal, polled every 20 ms, says it may be complete: kvmesh's workers' count of
applied writes (in Redis), and for make-mirror, which puts one key per revision, the
target's revision. Each end is then read from the target itself: every key's revision,
against the target's revision noted at each poll (benchcommon.Landing), since the workers'
count may come up to 0.25 s after the writes it counts. (Until 2026-11-29, night, each end
was the poll that saw it, and kvmesh's included the count's delay: 0.02-0.03 s in the runs
that printed it.) The CPU figures printed for kvmesh run until its end was seen.

The machine is shared and a single ratio moves by about 10% from run to run; `--repeat N`
runs both N times, alternating, each time with fresh targets (and a fresh Redis for
kvmesh), and prints every ratio and their median. `--json FILE` keeps every run's times
and ratio, written again after each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchcommon import (
    CACHE_PREFIX,
    ID_PREFIX,
    SOURCE,
    Landing,
    add_sync_option,
    applied_ops,
    busy_cores,
    byte_compile,
    check_alive,
    cpu_seconds,
    cpu_times,
    discard,
    mirror_command,
    pair_config,
    session_cpu_seconds,
    spawn,
    stop,
    sync_settings,
    wait_for,
    worker_command,
    workers_ready,
    write_json,
)

from pipeline.clients.broker import redis_at
from pipeline.clients.etcd import Etcd
from pipeline.tools.cilium_state import (
    cluster_config_value,
    identity_id,
    identity_labels,
    node_value,
    source_canaries,
    write_items,
)
from pipeline.tools.servers import EtcdServer, RedisServer


def canary_times(etcd: Etcd, t0: float, canaries: dict[str, float]) -> None:
    """Note when each synced canary of the source first shows in the target."""
    for key in etcd.keys(f"cilium/synced/{SOURCE}/".encode()):
        name = key.decode().split("/")[-2]
        canaries.setdefault(name, time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    ap.add_argument("--skip-mirror", action="store_true", help="measure kvmesh only")
    add_sync_option(ap, "batches_per_task=16")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both contenders this many times, alternating, and print the median ratio",
    )
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default="", help="write every run's times and ratio here")
    ap.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="also write this many nodes, a cluster config that advertises synced canaries "
        "and the source's canaries (to time each target canary; make-mirror copies only the "
        "identities either way)",
    )
    args = ap.parse_args()
    byte_compile()
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
    print(f"logs in {tmp}")
    src = EtcdServer(tmp / "source")
    src.start()
    try:
        source = Etcd(src.cluster())
        items = (
            (ID_PREFIX + str(identity_id(1, i)).encode(), identity_labels(SOURCE, i).encode())
            for i in range(args.keys)
        )
        write_items(source, items)
        if args.nodes:
            extra = {
                f"cilium/state/nodes/v1/{SOURCE}/node-{n}".encode(): node_value(SOURCE, 1, n)
                for n in range(args.nodes)
            }
            extra[f"cilium/cluster-config/{SOURCE}".encode()] = cluster_config_value(1)
            extra.update(source_canaries(SOURCE))
            write_items(source, extra)
        print(f"source: {source.count(ID_PREFIX)} identity ID keys, {args.nodes} nodes")
        source.close()
        ratios, kvmesh_times = [], []
        runs: list[dict[str, Any]] = []
        for i in range(args.repeat):
            run = tmp / f"run-{i + 1}"
            run.mkdir()
            t_kvmesh, used, late, busy = run_kvmesh(run, src, args)
            kvmesh_times.append(t_kvmesh)
            runs.append(
                {
                    "run": i + 1,
                    "kvmesh_s": round(t_kvmesh, 3),
                    "kvmesh_cpu_s": {k: round(v, 2) for k, v in used.items()},
                    # how much later the workers' count said the target held every key
                    "kvmesh_count_late_s": round(late, 3),
                    **busy,
                }
            )
            print(f"kvmesh:      {t_kvmesh:7.2f} s  ({args.keys / t_kvmesh:9.0f} keys/s)")
            print(
                "  CPU s until the end was seen: "
                + ", ".join(f"{k} {v:.2f}" for k, v in used.items())
                + f"; {sum(used.values()):.2f} in all, on {os.cpu_count()} cores"
            )
            if not args.skip_mirror:
                t_mirror = run_mirror(run, src, args)
                print(f"make-mirror: {t_mirror:7.2f} s  ({args.keys / t_mirror:9.0f} keys/s)")
                ratios.append(t_kvmesh / t_mirror)
                runs[-1].update(make_mirror_s=round(t_mirror, 3), ratio=round(ratios[-1], 4))
                print(
                    f"ratio kvmesh/make-mirror: {ratios[-1]:.3f}  "
                    f"(kvmesh is {1 / ratios[-1]:.1f}x faster; the goal is <= 0.10)"
                )
            if args.json:  # after every run: a long series stopped early keeps what it has
                write_json(
                    {
                        "keys": args.keys,
                        "concurrency": args.concurrency,
                        "pool": args.pool,
                        "runs": runs,
                        "median_ratio": statistics.median(ratios) if ratios else None,
                    },
                    args.json,
                )
        if len(kvmesh_times) > 1:
            print(f"kvmesh median: {statistics.median(kvmesh_times):.2f} s")
        if len(ratios) > 1:
            print(
                f"ratios: {' '.join(f'{r:.3f}' for r in ratios)}; "
                f"median {statistics.median(ratios):.3f}"
            )
        return 0
    finally:
        discard(src)


def run_kvmesh(
    tmp: Path, src: EtcdServer, args: argparse.Namespace
) -> tuple[float, dict[str, float], float, dict[str, float | None]]:
    """kvmesh's initial sync into a fresh target etcd, with a fresh Redis: seconds, the CPU
    seconds each process (or a worker's session: main process and pool) spent from the
    clock's start until the end was seen (a poll or two after the last key landed, the
    target etcd's and Redis's including what this script polls), how much later than
    the last key the workers' count said so, and how busy the machine was before the first
    canary and after."""
    procs: list[subprocess.Popen[bytes]] = []
    dst = EtcdServer(tmp / "target-kvmesh")
    broker = RedisServer(tmp / "redis")
    servers = [dst, broker]
    try:
        for s in servers:
            s.start()
        cfg = pair_config(tmp / "mesh.toml", broker.url, src.url, dst.url, sync_settings(args.sync))
        wlog = tmp / "worker.log"
        worker = spawn(procs, worker_command(cfg, args.concurrency, args.pool), wlog)
        wait_for(
            "the workers",
            lambda: workers_ready(wlog, args.pool, args.concurrency),
            60,
            wlog,
            [*procs, src, *servers],
        )
        target = Etcd(dst.cluster())
        stats = redis_at(broker.url)

        def cpu() -> dict[str, float]:
            return {
                "workers": session_cpu_seconds(worker.pid),
                "source etcd": cpu_seconds(src.pid),
                "target etcd": cpu_seconds(dst.pid),
                "redis": cpu_seconds(broker.pid),
            }

        cpu0 = cpu()
        t0 = time.monotonic()
        machine = [(t0, cpu_times())]  # the machine's CPU at each poll
        watcher = spawn(
            procs,
            [sys.executable, "-m", "pipeline", "watch", "--config", str(cfg)],
            tmp / "watch.log",
        )
        used: dict[str, float] = {}
        # The clock stops when the target holds every key, as make-mirror's does below. The
        # canaries are noted in the same loop and may come later: the watcher writes one once
        # a fence poll (sync.fence_poll_interval) has seen its resource complete.
        # The workers' count says when to look (it may come up to 0.25 s late), the target's
        # revisions when the last key landed (benchcommon.Landing).
        canaries: dict[str, float] = {}
        landing = Landing(target)
        t_kvmesh = late = 0.0
        deadline = time.monotonic() + args.timeout
        while (len(canaries) < 5 or not t_kvmesh) and time.monotonic() < deadline:
            check_alive([*procs, src, *servers], "kvmesh's initial sync")
            if not t_kvmesh:
                done = applied_ops(stats) >= args.keys and target.count(CACHE_PREFIX) >= args.keys
                landing.poll()  # after the count: once it says done, this covers every key
                if done:
                    seen = landing.polls[-1][0]
                    used = {"watcher": session_cpu_seconds(watcher.pid)}
                    used.update((k, v - cpu0[k]) for k, v in cpu().items())
                    t_kvmesh = landing.landed(CACHE_PREFIX, args.keys) - t0
                    late = seen - t0 - t_kvmesh
                    print(f"kvmesh's end seen {late:.2f} s after the last key landed")
            canary_times(target, t0, canaries)
            machine.append((time.monotonic(), cpu_times()))
            time.sleep(0.02)  # poll interval
        if not t_kvmesh:
            raise SystemExit(f"timed out: the target holds {target.count(CACHE_PREFIX)} keys")
        order = ", ".join(f"{n} {t:.2f} s" for n, t in sorted(canaries.items(), key=lambda x: x[1]))
        print(f"kvmesh target canaries: {order}")
        # the canaries of the empty resources are the first keys the watcher writes: until
        # then it starts alone, and the workers wait; then every process works until the
        # last key lands (the polls after that, until the end was seen, are left out)
        first = min(canaries.values())
        start = next(m for t, m in machine if t - t0 >= first)
        last = [m for t, m in machine if t - t0 <= t_kvmesh][-1]
        before, after = busy_cores(machine[0][1], start), busy_cores(start, last)
        busy = {
            "first_canary_s": round(first, 3),
            "busy_cores_until_first_canary": None if before is None else round(before, 2),
            # none if the first canary came as late as the last key
            "busy_cores_after": None if after is None or first >= t_kvmesh else round(after, 2),
        }
        print(
            f"machine busy: {busy['busy_cores_until_first_canary']} cores until the first "
            f"canary was seen ({first:.2f} s), {busy['busy_cores_after']} from then until "
            "the last poll before the last key landed"
        )
        stats.close()
        target.close()
        return t_kvmesh, used, late, busy
    finally:
        stop(procs)
        discard(*servers)


def run_mirror(tmp: Path, src: EtcdServer, args: argparse.Namespace) -> float:
    """make-mirror's initial sync into a fresh target etcd: seconds."""
    procs: list[subprocess.Popen[bytes]] = []
    dst = EtcdServer(tmp / "target-mirror")
    dst.start()
    try:
        target = Etcd(dst.cluster())
        rev0 = target.revision()
        t0 = time.monotonic()
        spawn(
            procs,
            mirror_command(src.url, dst.url),
            tmp / "mirror.log",
            dict(os.environ, ETCDCTL_API="3"),
        )
        # make-mirror puts one key per revision: N revisions must have passed before the
        # count is worth reading; the end is then timed as kvmesh's is
        landing = Landing(target)
        deadline = time.monotonic() + args.timeout
        while True:
            check_alive([*procs, src, dst], "make-mirror's initial sync")
            landing.poll()
            if landing.polls[-1][1] - rev0 >= args.keys and target.count(CACHE_PREFIX) >= args.keys:
                landing.poll()  # after the count: this one covers every key
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: the target holds {target.count(CACHE_PREFIX)} keys")
            time.sleep(0.02)  # poll interval
        done = landing.landed(CACHE_PREFIX, args.keys)
        target.close()
        return done - t0
    finally:
        stop(procs)
        discard(dst)


if __name__ == "__main__":
    raise SystemExit(main())
