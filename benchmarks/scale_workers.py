"""Does the write side scale out? The initial sync of N identities, and the throughput of a
burst of changes, with 1, 2, 4 and 8 worker slots, through a link with a round trip.

    python benchmarks/scale_workers.py [--keys 50000] [--workers 1 2 4 8]
        [--delay 0.005] [--pools prefork threads solo] [--repeat 1] [--json FILE] [--png FILE]

Each run gets a fresh target etcd behind `benchmarks/delay_proxy.py`, which delays every
byte by `--delay` seconds each way (default 5 ms: a cross-zone round trip of 10 ms), and a
fresh watcher and worker pool. The JSON says how late the proxy wrote the bytes while the
backlog drained (`backlog_link_late_ms`) and how long it waited for a core
(`backlog_proxy_runq_ms_per_s`): whether the link was the same at every slot count. The
source etcd, holding N identity ID keys, and Redis are shared by the runs.

- **Initial sync:** from the watcher's start until the target holds N keys (read from the
  target directly, not through the proxy).
- **Burst throughput** (`churn_keys_per_s` in the JSON): every key is then rewritten once
  (in transactions of 127 puts, far faster than any pool here applies them). Throughput
  is N over the time from the first put until the last key landed in the target. The
  workers' count of applied operations (their stats hash in Redis, polled every 20 ms)
  says when the phase is over; then every key is read back, checked, and timed by the
  revision that wrote it against the target's revision noted at each poll (class
  Progress). (A watch on the target, the way this was timed before 2026-11-29, took
  10-14% of a core on this 2-core machine, as much as a pool process.)
  Keys are distinct, so no change is coalesced away: each is one write to the target. This
  includes the source's writes and the watcher's publishing (about 2 s for 50,000 keys),
  which the pool cannot shorten.
- **Backlog throughput:** the pool is then paused (SIGSTOP), every key rewritten once more,
  and once the watcher has published all N changes (its `ops_published` metric) the pool
  resumes; throughput is N over the time until the count has grown by N. This is the
  write side alone: what more workers buy. The script also reports the sustained pace,
  from 10% to 90% of the keys arrived (without the pool's start after the pause and the
  tail of the last tasks), and how long the first and the last tenth took.
- **Bare transactions** (`bare_keys_per_s`), the baseline of the same run: with the pool
  stopped again, as many processes as slots write the same N keys to the same target
  through the same proxy, and nothing else: no broker, no decoding, no fence. Each takes
  the next transaction when done with its last, as a slot takes the next task. The
  transactions are as large as the backlog's on average (its keys over the revisions that
  wrote them), the first run's of the round for every run of the round, so that the
  round's ratios compare the same work. It is timed from the start signal until the last
  process had its last answer (kvmesh's backlog: from before the resume until the first
  poll that saw its last key, to within a 20 ms poll). Its ratio is what this machine,
  link and target allow that many processes; kvmesh's backlog ratio can be read against
  it.

`--pools` names how the slots run: `prefork` (the default) is one worker whose main
process hands each task to one of N pool processes; `threads` is one worker of N threads;
`solo` is N one-slot workers side by side (`benchmarks/worker_group.py`), each taking its
tasks from Redis and applying them in its own process, as N replicas of a worker with
`worker.pool = "solo"` do. The group is paused, resumed and counted as one worker.

The watcher runs with `sync.shards = 16`, so that 8 slots are not capped by the number of
shards (a shard's batches are applied in order, one at a time).

On this shared 2-core machine one run's figures move by 10% or more from run to run.
`--repeat N` measures every worker count N times, in rounds (the order of the counts, and
of the pools, turned around every other round, so that neither end of a list always runs
on a warmer or a quieter machine: an even N balances it), compares each count with the
first one of its own round, and prints the median of those ratios. The PNG then shows
each count's median throughput, with the smallest and the largest figure as a bar (a ratio
of those medians need not be the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchcommon import (
    CACHE_PREFIX,
    ID_PREFIX,
    SOURCE,
    Landing,
    WakeProbe,
    Watched,
    add_sync_option,
    applied_ops,
    byte_compile,
    celery_main_cpu_seconds,
    cpu_seconds,
    cpu_times,
    discard,
    pair_config,
    pyplot,
    session_cpu_seconds,
    spawn,
    stop,
    sync_settings,
    wait_for,
    worker_command,
    workers_ready,
    write_json,
)
from delay_proxy import late_ms, late_stats

from pipeline.clients.broker import redis_at
from pipeline.clients.etcd import Etcd, Put
from pipeline.config import ClusterConfig
from pipeline.protocol.names import stats_key
from pipeline.tools.cilium_state import identity_id, identity_labels, write_items
from pipeline.tools.lab.view import scrape
from pipeline.tools.servers import EtcdServer, RedisServer, free_port

HERE = Path(__file__).resolve().parent


def identities(n: int, marker: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (ID_PREFIX + str(identity_id(1, i)).encode(), identity_labels(SOURCE, i).encode() + marker)
        for i in range(n)
    ]


def runq_seconds(pid: int) -> float:
    """Seconds the process *pid* (its threads so far) waited on a run queue for a core,
    from /proc/PID/schedstat."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def link_stats(proxy: subprocess.Popen[bytes], path: Path) -> Counter[int]:
    """How late the proxy wrote the bytes so far (its stats file, written when asked by
    SIGUSR1; see delay_proxy.py)."""
    seq = late_stats(path)[0]
    proxy.send_signal(signal.SIGUSR1)
    wait_for("the proxy's stats", lambda: late_stats(path)[0] > seq, 10)
    return late_stats(path)[1]


def bare_client(
    port: int, txns: list[list[tuple[bytes, bytes]]], turn: Any, ready: Any, go: Any, out: Any
) -> None:
    """One process of the bare baseline: takes the next of *txns* (the shared counter
    *turn*) until none is left, each one transaction of puts through the proxy at *port*,
    as a worker slot takes the next task from the queue. Puts ("done", time.monotonic())
    on *out* when it is done (a clock every process of the machine shares), or ("error",
    what happened)."""
    try:
        etcd = Etcd(ClusterConfig(name="bare", id=2, endpoints=(f"http://127.0.0.1:{port}",)))
        ops = [[Put(k, v) for k, v in txn] for txn in txns]  # built before the clock starts
        etcd.txn([], [Put(b"bench/bare-warm", b"1")])  # the connection, made
        ready.release()
        go.wait()
        while True:
            with turn.get_lock():
                i = turn.value
                turn.value += 1
            if i >= len(ops):
                break
            etcd.txn([], ops[i])
        out.put(("done", time.monotonic()))
        etcd.close()
    except BaseException as exc:  # the parent must hear of it, not wait for it
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def bare(port: int, items: list[tuple[bytes, bytes]], slots: int, per_txn: int) -> float:
    """The baseline: what *slots* processes that do nothing but write *items* in
    transactions of *per_txn* puts (each taking the next transaction when done with its
    last, as a worker slot applies tasks) reach through the same link to the same target.
    Keys per second, from the start signal until the last process had its last answer."""
    ctx = multiprocessing.get_context("spawn")  # gRPC channels do not survive a fork
    txns = [items[i : i + per_txn] for i in range(0, len(items), per_txn)]
    turn, ready, go, out = ctx.Value("l", 0), ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=bare_client, args=(port, txns, turn, ready, go, out), daemon=True)
        for _ in range(slots)
    ]
    for p in procs:
        p.start()

    def answer(deadline: float) -> float:
        """The next process's end, or SystemExit if one failed or died, or at *deadline*."""
        while time.monotonic() < deadline:
            try:
                what, value = out.get(timeout=1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit("a bare client died") from None
                continue
            if what == "error":
                raise SystemExit(f"a bare client failed: {value}")
            return float(value)
        raise SystemExit("the bare clients did not finish")

    try:
        started = time.monotonic() + 60
        for _ in procs:
            while not ready.acquire(timeout=1):
                if time.monotonic() > started or any(p.exitcode is not None for p in procs):
                    try:
                        said = out.get(timeout=1)[1]
                    except queue.Empty:
                        said = "no word from it"
                    raise SystemExit(f"a bare client did not start: {said}")
        t0 = time.monotonic()
        go.set()
        ends = [answer(time.monotonic() + 600) for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    return len(items) / (max(ends) - t0)


class Progress:
    """One phase's N writes: the workers' count of operations applied says when the phase
    is over, and the target's revisions when each key landed (benchcommon.Landing),
    checked against this phase's marker."""

    def __init__(self, client: Any, direct: Etcd) -> None:
        self.client = client
        self.base = self.quiet()
        self.landing = Landing(direct)

    def quiet(self, still: float = 0.5) -> int:
        """The count once it has not moved for *still* seconds: the last tasks of the phase
        before may still add theirs after the target already holds every key."""
        last, since = applied_ops(self.client), time.monotonic()
        while time.monotonic() - since < still:
            time.sleep(0.05)  # poll interval
            now = applied_ops(self.client)
            if now != last:
                last, since = now, time.monotonic()
        return last

    def reached(self, n: int) -> bool:
        done = applied_ops(self.client) - self.base >= n
        self.landing.poll()  # after the count: once it says done, this poll covers every key
        return done

    def land(self, keys: int, marker: bytes) -> float:
        """Every key holds this phase's value (the count was not fooled): when the last one
        landed."""
        return self.landing.landed(CACHE_PREFIX, keys, marker)

    def sustained(self, n: int) -> float:
        """Writes per second from 10% to 90% of *n* landed: the pace once every slot is
        busy, without the first tasks' start or the last ones' tail."""
        return self.landing.pace(int(0.1 * n), int(0.9 * n))


def run(
    tmp: Path,
    src: EtcdServer,
    broker: RedisServer,
    keys: int,
    pool: str,
    slots: int,
    delay: float,
    shards: int = 16,
    sync: dict[str, Any] | None = None,
    round_: int = 1,
    bare_per_txn: int | None = None,
) -> dict[str, Any]:
    name = f"{pool}-{slots}" + (f"-{round_}" if round_ > 1 else "")
    procs: list[subprocess.Popen[bytes]] = []
    target = EtcdServer(tmp / f"target-{name}")
    target.start()
    servers: list[Watched] = [target, src, broker]  # watched by the waits, with procs

    try:
        port = free_port()
        proxy = spawn(
            procs,
            [
                *(sys.executable, str(HERE / "delay_proxy.py")),
                *(str(port), str(target.port), str(delay)),
                *("--stats", str(tmp / f"proxy-{name}.json")),
            ],
            tmp / f"proxy-{name}.log",
        )
        wait_for(
            "the proxy",
            lambda: b"ready" in (tmp / f"proxy-{name}.log").read_bytes(),
            10,
            tmp / f"proxy-{name}.log",
            [*procs, *servers],
        )
        (tmp / name).mkdir()
        cfg = pair_config(
            tmp / name / "mesh.toml",
            broker.url,
            src.url,
            f"http://127.0.0.1:{port}",
            {"shards": shards, **(sync or {})},
        )
        kvmesh = [sys.executable, "-m", "pipeline"]
        wlog = tmp / f"worker-{name}.log"
        worker = spawn(
            procs,
            worker_command(cfg, slots, pool),
            wlog,
        )
        # nothing is measured from the start signal
        wait_for(
            "the worker", lambda: workers_ready(wlog, pool, slots), 60, wlog, [*procs, *servers]
        )
        direct = Etcd(target.cluster())
        t0 = time.monotonic()
        mport = free_port()
        spawn(
            procs,
            [*kvmesh, "watch", "--config", str(cfg)],
            tmp / f"watch-{name}.log",
            dict(os.environ, KVMESH_METRICS_WATCHER_PORT=str(mport)),
        )
        synced = wait_for(
            "the initial sync",
            lambda: direct.count(CACHE_PREFIX) >= keys,
            600,
            wlog,
            [*procs, *servers],
        )
        stats = redis_at(broker.url)
        marker = f";run={name}".encode()
        seen = Progress(stats, direct)
        source = Etcd(src.cluster())
        busy0, total0 = cpu_times()
        t1 = time.monotonic()
        write_items(source, identities(keys, marker))
        written = time.monotonic()
        wait_for("the churn", lambda: seen.reached(keys), 600, wlog, [*procs, *servers])
        busy1, total1 = cpu_times()
        done = seen.land(keys, marker)

        # the backlog: the pool paused while the watcher publishes every change
        def published() -> float:
            m = scrape(mport)
            return sum(v for k, v in m.items() if k.startswith("kvmesh_watcher_ops_published"))

        def counts() -> dict[str, float]:
            """Tasks and batches the watcher published, and the workers' outcomes."""
            m = scrape(mport)
            out = {
                what: sum(v for k, v in m.items() if k.startswith(f"kvmesh_watcher_{what}_total"))
                for what in ("tasks_published", "batches_published")
            }
            raw = stats.hgetall(stats_key(SOURCE, "cluster-b"))
            out.update(
                {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
            )
            return out

        marker2 = f";backlog={name}".encode()
        base = published()
        seen2 = Progress(stats, direct)  # waits for the burst's last counts
        before = counts()
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            write_items(source, identities(keys, marker2))
            wait_for(
                "the watcher's publishing",
                lambda: published() >= base + keys,
                600,
                None,
                [*procs, *servers],
            )
            late0 = link_stats(proxy, tmp / f"proxy-{name}.json")
            busy2, total2 = cpu_times()
            assert target.proc is not None
            parts0 = (
                cpu_seconds(proxy.pid),
                cpu_seconds(target.proc.pid),
                session_cpu_seconds(worker.pid),
                celery_main_cpu_seconds(worker.pid),
            )
            waited0 = runq_seconds(proxy.pid)
            probe = WakeProbe().start()
            t2 = time.monotonic()
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        counted = wait_for(
            "the backlog", lambda: seen2.reached(keys), 600, wlog, [*procs, *servers]
        )
        wake_us = probe.stop()
        busy3, total3 = cpu_times()
        parts1 = (
            cpu_seconds(proxy.pid),
            cpu_seconds(target.proc.pid),
            session_cpu_seconds(worker.pid),
            celery_main_cpu_seconds(worker.pid),
        )
        after = counts()
        waited1 = runq_seconds(proxy.pid)
        late1 = link_stats(proxy, tmp / f"proxy-{name}.json")
        late = late1 - late0  # the backlog's bytes
        drained = seen2.land(keys, marker2)
        stats.close()
        moved = {k: int(after.get(k, 0) - before.get(k, 0)) for k in after}
        # the baseline, with the workers stopped: bare transactions as large as the
        # backlog's on average (the revisions that wrote its keys: one per transaction),
        # or as the round's first run's, if given (one size for all the runs of a round)
        txns = len(set(seen2.landing.revs))
        per_txn = bare_per_txn or max(1, round(keys / txns))
        items = [(CACHE_PREFIX + k[len(ID_PREFIX) :], v) for k, v in identities(keys, b"")]
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            bare_rate = bare(port, items, slots, per_txn)
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        source.close()
        direct.close()
        return {
            "pool": pool,
            "slots": slots,
            "delay_ms": delay * 1000,
            "initial_sync_s": round(synced - t0, 2),
            "churn_s": round(done - t1, 2),
            "churn_keys_per_s": round(keys / (done - t1)),
            "source_write_s": round(written - t1, 2),
            # how busy the whole machine (every core) was while the churn was applied
            "churn_cpu_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0)),
            "backlog_s": round(drained - t2, 2),
            # how much later the workers' count said so (what the time was before 2026-11-29)
            "backlog_count_late_s": round(counted - drained, 2),
            "backlog_keys_per_s": round(keys / (drained - t2)),
            "backlog_sustained_keys_per_s": round(seen2.sustained(keys)),
            # how the drain split: the first 10% of the keys, and the last 10%
            "backlog_first_tenth_s": round(seen2.landing.when(int(0.1 * keys)) - t2, 2),
            "backlog_last_tenth_s": round(drained - seen2.landing.when(int(0.9 * keys)), 2),
            # the keys per transaction in each tenth of the keys, in the order they landed
            "backlog_keys_per_txn_by_tenth": seen2.landing.keys_per_txn(10),
            # (seconds since the pool resumed, keys landed), as polled
            "backlog_curve": seen2.landing.curve(t2),
            # what the backlog was cut into, and how the workers found it: batches handed
            # back to the queue because their predecessor had not landed (gap_wait), and
            # batches landed by a group transaction (grouped)
            "backlog_tasks": moved.get("tasks_published", 0),
            "backlog_batches": moved.get("batches_published", 0),
            "backlog_gap_waits": moved.get("gap_wait", 0),
            "backlog_grouped": moved.get("grouped", 0),
            "backlog_cpu_busy_pct": round(100 * (busy3 - busy2) / max(1, total3 - total2)),
            # of one core, while the backlog drained: the delay proxy (one Python process,
            # part of the test bench) and the target etcd
            "backlog_proxy_core_pct": round(100 * (parts1[0] - parts0[0]) / (counted - t2)),
            "backlog_target_etcd_core_pct": round(100 * (parts1[1] - parts0[1]) / (counted - t2)),
            # how faithful the link was while the backlog drained: how late the proxy wrote
            # the bytes, against the delay (the median and the 99th percentile, in ms, of
            # the bytes; at the upper end of a 0.1 ms step)
            "backlog_link_late_ms": [late_ms(late, 0.5), late_ms(late, 0.99)],
            # how long the proxy waited for a core, in ms per second of the backlog (its
            # run-queue wait: time its bytes sat unread, not in the figure above)
            "backlog_proxy_runq_ms_per_s": round(1000 * (waited1 - waited0) / (counted - t2), 1),
            # what a wait cost while the backlog drained: the CPU charged to a thread of this
            # script per 12 ms sleep (benchcommon.WakeProbe), in µs
            "backlog_wake_us": round(wake_us, 1),
            # CPU the worker (its main process and its pool) spent on the backlog, per task
            "backlog_worker_cpu_ms_per_task": round(
                1000 * (parts1[2] - parts0[2]) / max(1, moved.get("tasks_published", 0)), 1
            ),
            # of which the Celery main process (or processes): with prefork, what takes the
            # tasks from Redis and hands them to the pool; with solo, the whole worker
            "backlog_worker_main_cpu_ms_per_task": round(
                1000 * (parts1[3] - parts0[3]) / max(1, moved.get("tasks_published", 0)), 1
            ),
            # the same writes as bare transactions of as many processes as slots (function
            # bare): what this machine, link and target allow a pool that did nothing else
            "bare_keys_per_s": round(bare_rate),
            "bare_puts_per_txn": per_txn,
            "backlog_txns": txns,
        }
    finally:
        stop(procs)
        discard(target)


RATIOS = (
    ("vs_first", "churn_keys_per_s"),
    ("backlog_vs_first", "backlog_keys_per_s"),
    ("sustained_vs_first", "backlog_sustained_keys_per_s"),
    ("bare_vs_first", "bare_keys_per_s"),
)


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pool and slot count, the median of each figure and each ratio over the rounds,
    with the smallest and the largest throughput of the rounds."""
    out = []
    for pool in dict.fromkeys(r["pool"] for r in rows):
        for slots in dict.fromkeys(r["slots"] for r in rows if r["pool"] == pool):
            rs = [r for r in rows if r["pool"] == pool and r["slots"] == slots]
            m: dict[str, Any] = {"pool": pool, "slots": slots, "rounds": len(rs)}
            for key in ("initial_sync_s", *(k for pair in RATIOS for k in pair)):
                values = [r[key] for r in rs]
                m[key] = round(statistics.median(values), 2)
                m[f"{key}_range"] = [min(values), max(values)]
            out.append(m)
    return out


def draw(rows: list[dict[str, Any]], png: str) -> None:
    plt = pyplot()

    pools = list(dict.fromkeys(r["pool"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5 if len(pools) == 1 else 5))

    def line(
        ax: Any, rs: list[dict[str, Any]], key: str, style: str, label: str, color: str
    ) -> None:
        xs = [r["slots"] for r in rs]
        ys = [r[key] for r in rs]
        if rs and rs[0]["rounds"] > 1:  # the median, and the rounds' range as a bar
            lo = [y - r[f"{key}_range"][0] for y, r in zip(ys, rs, strict=True)]
            hi = [r[f"{key}_range"][1] - y for y, r in zip(ys, rs, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=label, color=color)
        else:
            ax.plot(xs, ys, style, label=label, color=color)

    summary = medians(rows)
    for i, pool in enumerate(pools):  # a colour per pool, a line style per figure
        rs = [r for r in summary if r["pool"] == pool]
        c = f"C{i}"
        line(a, rs, "backlog_keys_per_s", "o-", f"{pool}: backlog", c)
        line(a, rs, "backlog_sustained_keys_per_s", "^:", f"{pool}: backlog, 10-90%", c)
        line(a, rs, "churn_keys_per_s", "s--", f"{pool}: burst", c)
        line(a, rs, "bare_keys_per_s", "x-.", f"{pool}: bare transactions (baseline)", c)
        line(b, rs, "initial_sync_s", "o-", pool, c)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("worker slots")
        ax.legend(loc="upper left", fontsize="small" if len(pools) == 1 else "x-small")
        ax.set_ylim(bottom=0)
    a.set_ylabel("target writes per second")
    b.set_ylabel("initial sync (s)")
    delay = rows[0]["delay_ms"] if rows else 0
    rounds = summary[0]["rounds"] if summary else 1
    fig.suptitle(
        f"kvmesh workers, {2 * delay:.0f} ms round trip to the target, 2 cores"
        + (f" (median of {rounds} rounds)" if rounds > 1 else "")
    )
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument(
        "--pools", nargs="+", default=["prefork"], choices=["prefork", "threads", "solo"]
    )
    ap.add_argument("--delay", type=float, default=0.005, help="seconds each way")
    ap.add_argument("--shards", type=int, default=16, help="sync.shards of the watcher")
    add_sync_option(ap, "idle_flush=false")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every worker count")
    ap.add_argument("--json", default="")
    ap.add_argument("--png", default="")
    args = ap.parse_args()
    if args.repeat < 1:
        print("scale_workers: --repeat must be at least 1", file=sys.stderr)
        return 2
    byte_compile()
    sync = sync_settings(args.sync)
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-scale-"))
    print(f"logs in {tmp}", flush=True)
    src = EtcdServer(tmp / "source")
    broker = RedisServer(tmp / "redis")
    src.start()
    broker.start()
    rows: list[dict[str, Any]] = []
    try:
        source = Etcd(src.cluster())
        write_items(source, identities(args.keys, b""))
        source.close()
        print(
            f"{'pool':>8} {'slots':>5} {'initial sync s':>15} {'burst keys/s':>13} "
            f"{'vs 1':>5} {'CPU %':>5} {'backlog keys/s':>15} {'vs 1':>5} {'CPU %':>5} "
            f"{'proxy %':>7} {'etcd %':>6} {'sustained':>9} {'vs 1':>5} {'1st/last 10% s':>14} "
            f"{'bare keys/s':>11} {'vs 1':>5}",
            flush=True,
        )
        for round_ in range(1, args.repeat + 1):
            bare_size: int | None = None  # the round's first run's, for all its runs
            # the pools' order turns around every other round too
            for pool in args.pools if round_ % 2 else args.pools[::-1]:
                order = args.workers if round_ % 2 else args.workers[::-1]
                done: dict[int, dict[str, Any]] = {}
                for slots in order:
                    r = run(
                        tmp,
                        src,
                        broker,
                        args.keys,
                        pool,
                        slots,
                        args.delay,
                        args.shards,
                        sync,
                        round_,
                        bare_size,
                    )
                    bare_size = bare_size or r["bare_puts_per_txn"]
                    r["shards"] = args.shards
                    r["sync"] = sync
                    r["round"] = round_
                    r["seq"] = sum(len(d) for d in (rows, done))  # the order the runs ran in
                    done[slots] = r
                    first = done.get(args.workers[0])
                    if first is not None:  # compare with the first count of this round
                        for later in done.values():
                            for ratio, key in RATIOS:
                                later[ratio] = round(later[key] / first[key], 2)
                    print(
                        f"{pool:>8} {slots:>5} {r['initial_sync_s']:>15} "
                        f"{r['churn_keys_per_s']:>13} {r.get('vs_first', '-'):>5} "
                        f"{r['churn_cpu_busy_pct']:>5} {r['backlog_keys_per_s']:>15} "
                        f"{r.get('backlog_vs_first', '-'):>5} {r['backlog_cpu_busy_pct']:>5} "
                        f"{r['backlog_proxy_core_pct']:>7} {r['backlog_target_etcd_core_pct']:>6} "
                        f"{r['backlog_sustained_keys_per_s']:>9} "
                        f"{r.get('sustained_vs_first', '-'):>5} "
                        f"{r['backlog_first_tenth_s']:>6}/{r['backlog_last_tenth_s']:<7} "
                        f"{r['bare_keys_per_s']:>11} {r.get('bare_vs_first', '-'):>5}  "
                        f"tasks {r['backlog_tasks']} batches {r['backlog_batches']} "
                        f"gap_wait {r['backlog_gap_waits']} "
                        f"worker CPU/task {r['backlog_worker_cpu_ms_per_task']} ms "
                        f"(main {r['backlog_worker_main_cpu_ms_per_task']}) "
                        "link late p50/p99 {}/{} ms, proxy waited {} ms/s, a wait {} us".format(
                            *r["backlog_link_late_ms"],
                            r["backlog_proxy_runq_ms_per_s"],
                            r["backlog_wake_us"],
                        ),
                        flush=True,
                    )
                rows += [done[slots] for slots in args.workers]
                if round_ % 2 == 0 and len(args.workers) > 1:  # printed with "-" above
                    print(
                        f"round {round_}, vs {args.workers[0]} slot(s): "
                        + ", ".join(
                            f"{n}: {done[n]['backlog_vs_first']} / {done[n]['sustained_vs_first']}"
                            f" / {done[n]['bare_vs_first']}"
                            for n in args.workers[1:]
                        )
                        + " (backlog / sustained / bare)",
                        flush=True,
                    )
                if args.json:  # after every round: a failed run later keeps these
                    write_json(rows, args.json)
    finally:
        discard(src, broker)
    if args.repeat > 1:
        print(
            f"median of {args.repeat} rounds, each against {args.workers[0]} slot(s) of its round:"
        )
        for m in medians(rows):
            print(
                f"{m['pool']:>8} {m['slots']:>5}  burst {m['vs_first']:>5}  "
                f"backlog {m['backlog_vs_first']:>5} {m['backlog_vs_first_range']}  "
                f"sustained {m['sustained_vs_first']:>5} {m['sustained_vs_first_range']}  "
                f"bare {m['bare_vs_first']:>5} {m['bare_vs_first_range']}"
            )
    if args.png:
        draw(rows, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
