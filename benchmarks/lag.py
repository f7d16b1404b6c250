"""Steady-state lag: the delay from a put in the source etcd to the key's arrival in the
target etcd, for kvmesh and for `etcdctl make-mirror`, in the same run, on the same machine.

    python benchmarks/lag.py [--rates 200 1000 5000] [--keys 1000] [--seconds 10]
        [--concurrency 2] [--pool prefork] [--sync KEY=VALUE]... [--skip-mirror]
        [--delay 0] [--load 0] [--rounds 1] [--json FILE] [--png FILE] [--trace FILE]
        [--redraw FILE]

With `--pool solo`, `--concurrency` solo workers run side by side (before 99919b8, one
solo worker, whatever the concurrency: the solo figures in performance-log.md from before are
of one).

Each contender has a source etcd of its own, holding the same `--keys` identity ID keys:
kvmesh (a watcher and a worker pool) copies its source into one target etcd, make-mirror
its source into another; both run from the start, and measuring starts once both targets
hold every key. Then, for each rate and each contender in turn, writer threads rewrite the
keys in that contender's source at that many puts a second for `--seconds`, while the other
contender, whose source is quiet, idles. Each put writes a value with its own sequence
number, and a watch on each target notes when each arrives.

(Until 2026-11-29 both read one source, and the contender not measured was paused with
SIGSTOP so as not to take CPU from the other. A paused process keeps its watches on the
source open, and etcd's delivery of events to every watcher slowed down behind the stalled
one: a stopped `etcdctl watch` on the source alone raised kvmesh's p99 at 200 puts/s from
about 10 ms to 22 ms.)

A put has arrived once the target holds its value or a newer one for the same key: kvmesh
coalesces changes to one key made within a flush, and the newer value carries the older put's
effect. Delays run from just before each put is sent. The benchmark also checks what no
contender may do: end with a value other than the last put (lost), or let a key's values
arrive out of order (reordered).

Two options change the machine the contenders run on:
- `--delay S` puts each target etcd behind `benchmarks/delay_proxy.py`, which delays every
  byte by S seconds each way: both contenders then write through a link with a round trip
  of 2 x S, as in a mesh whose clusters are a network hop apart. Arrivals are still watched
  on the target itself, without the delay.
- `--load CORES` runs `benchmarks/cpu_load.py` beside them from the start, as many
  processes as whole cores asked for, each busy for its share of every 10 ms: a neighbour
  taking that much of the two cores, so that a run sees a machine with less to spare when
  asked, not only in the hours when the machine is slow.

A single run's p99 moves a lot on a shared machine (at 200 puts/s, from 12 to 20 ms for the
same code within an evening). `--rounds N` measures every rate N times over, with the same
processes, and prints each percentile's median and range; the picture shows the medians
with the range as error bars.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchcommon import (
    CACHE_PREFIX,
    ID_PREFIX,
    SOURCE,
    Watched,
    add_sync_option,
    byte_compile,
    check_alive,
    discard,
    mirror_command,
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

from pipeline.clients.etcd import Etcd, Event, Put
from pipeline.tools.cilium_state import identity_id, identity_labels, write_items
from pipeline.tools.servers import EtcdServer, RedisServer, free_port

HERE = Path(__file__).resolve().parent

SEQ = b";seq="


def key_of(i: int) -> bytes:
    return str(identity_id(1, i)).encode()


class Arrivals:
    """What a watch on one target saw: per key suffix, the sequence numbers in arrival
    order, and when each arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[bytes, list[tuple[int, float]]] = {}
        self.errors: list[str] = []

    def on_events(self, events: list[Event], _rev: int) -> None:
        now = time.monotonic()
        with self.lock:
            for ev in events:
                if ev.value is None or SEQ not in ev.value:
                    continue
                seq = int(ev.value.rsplit(SEQ, 1)[1])
                self.seen.setdefault(ev.key[len(CACHE_PREFIX) :], []).append((seq, now))

    def on_error(self, exc: BaseException) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}")


class Writer(threading.Thread):
    """Puts the sequence numbers *seqs*, each at its slot of a schedule of *rate* puts a
    second that starts at *t0* with sequence number *first*; sequence number n rewrites
    key n mod *keys*. Puts due together go in one transaction of *group* puts (each still
    its own event, with its own revision index), all sent at once."""

    def __init__(
        self, etcd: Etcd, seqs: range, first: int, rate: float, keys: int, t0: float, group: int
    ) -> None:
        super().__init__(daemon=True)
        self.group = group  # puts a transaction: one request a put is too slow past ~500/s
        self.etcd, self.seqs, self.first = etcd, seqs, first
        self.rate, self.keys, self.t0 = rate, keys, t0
        self.sent: list[tuple[int, int, float]] = []  # (seq, key index, time sent)

    def run(self) -> None:
        seqs = list(self.seqs)
        for at in range(0, len(seqs), self.group):
            group = seqs[at : at + self.group]
            delay = self.t0 + (group[0] - self.first) / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing to the schedule, not a wait on state
            puts = [
                (seq, seq % self.keys, identity_labels(SOURCE, seq % self.keys).encode())
                for seq in group
            ]
            sent = time.monotonic()
            self.etcd.txn(
                [], [Put(ID_PREFIX + key_of(i), v + SEQ + str(seq).encode()) for seq, i, v in puts]
            )
            self.sent += [(seq, i, sent) for seq, i, _ in puts]


def churn(
    src: EtcdServer, rate: int, count: int, first: int, keys: int
) -> tuple[list[tuple[int, int, float]], float]:
    """Put sequence numbers first .. first + count - 1 at *rate* a second; returns what was
    sent (sequence number, key index, time) in order, and the seconds it took."""
    writers = min(4, math.ceil(rate / 500))
    # a writer makes about 250 requests a second here; past that, puts share them
    group = max(1, math.ceil(rate / writers / 250))
    clients = [Etcd(src.cluster()) for _ in range(writers)]
    t0 = time.monotonic() + 0.2
    threads = [
        Writer(clients[w], range(first + w, first + count, writers), first, rate, keys, t0, group)
        for w in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    elapsed = max(s for t in threads for _, _, s in t.sent) - t0
    return sorted(x for t in threads for x in t.sent), elapsed


def lost_keys(final: dict[bytes, bytes], last: dict[int, int]) -> int:
    """Keys whose value in a target (*final*, its cache) is not their last put (*last*:
    sequence number by key index)."""
    return sum(
        1
        for i, seq in last.items()
        if not final.get(CACHE_PREFIX + key_of(i), b"").endswith(SEQ + str(seq).encode())
    )


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def judge(
    arrivals: Arrivals, sent: list[tuple[int, int, float]], keys: int, seqs: range
) -> dict[str, Any]:
    """Delays (ms), puts not seen and keys reordered, for the puts in *seqs*."""
    with arrivals.lock:
        seen = {k: list(v) for k, v in arrivals.seen.items()}
    delays: list[float] = []
    trace: list[tuple[float, float]] = []
    reordered = 0
    by_key: dict[int, list[tuple[int, float]]] = {}
    for i in range(keys):
        got = [(s, t) for s, t in seen.get(key_of(i), []) if s in seqs]
        if any(b[0] < a[0] for a, b in itertools.pairwise(got)):
            reordered += 1
        by_key[i] = got
    unseen = 0
    for seq, i, t_sent in sent:
        # arrived with the first value of this put's sequence number or a newer one
        t = next((t for s, t in by_key[i] if s >= seq), None)
        if t is None:
            unseen += 1
        else:
            delays.append((t - t_sent) * 1000)
            trace.append((t_sent, (t - t_sent) * 1000))
    return {
        "p50_ms": round(percentile(delays, 50), 2),
        "p99_ms": round(percentile(delays, 99), 2),
        "max_ms": round(max(delays), 2) if delays else math.nan,
        "puts": len(sent),
        "not_arrived": unseen,
        "reordered_keys": reordered,
        "trace": trace,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[200, 1000, 5000])
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0, help="of churn per rate")
    ap.add_argument("--concurrency", type=int, default=2, help="kvmesh worker pool slots")
    ap.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    add_sync_option(ap, "linger=0.005")
    ap.add_argument("--skip-mirror", action="store_true", help="measure kvmesh only")
    ap.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds each way of a link in front of each target etcd (0: none)",
    )
    ap.add_argument(
        "--load",
        type=float,
        default=0.0,
        help="cores a neighbour keeps busy throughout (benchmarks/cpu_load.py; 0: none)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every rate this many times over (the same processes), and print "
        "each percentile's median and range",
    )
    ap.add_argument("--json", default="", help="write the results to this file")
    ap.add_argument("--trace", default="", help="append each put's send time and delay here")
    ap.add_argument("--png", default="", help="draw p50 and p99 by rate to this file")
    ap.add_argument("--redraw", default="", help="only draw --png from this JSON of a run")
    args = ap.parse_args()
    if args.delay < 0 or not 0 <= args.load <= (os.cpu_count() or 1):
        raise SystemExit("--delay must be at least 0, --load from 0 to the number of cores")
    byte_compile()
    if args.redraw:
        draw(json.loads(Path(args.redraw).read_text()), args.png)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-lag-"))
    print(f"logs in {tmp}", flush=True)
    servers: list[Watched] = []
    procs: list[subprocess.Popen[bytes]] = []
    streams = []

    try:
        src_k, src_m, dst_k, dst_m = (
            EtcdServer(tmp / n) for n in ("source-kvmesh", "source-mirror", "kvmesh", "mirror")
        )
        broker = RedisServer(tmp / "redis")
        for s in (src_k, src_m, dst_k, dst_m, broker):
            s.start()
            servers.append(s)
        sources = {"kvmesh": src_k, "make-mirror": src_m}
        # where each contender writes: the target itself, or a link in front of it
        dst_url = {"kvmesh": dst_k.url, "make-mirror": dst_m.url}
        if args.delay > 0:
            for name, dst in (("kvmesh", dst_k), ("make-mirror", dst_m)):
                dst_url[name] = link(procs, tmp, name, dst, args.delay, servers)
        if args.load > 0:
            hogs = math.ceil(args.load)
            for i in range(hogs):
                share = str(args.load / hogs)
                spawn(
                    procs, [sys.executable, str(HERE / "cpu_load.py"), share], tmp / f"load{i}.log"
                )
        for src in sources.values():
            source = Etcd(src.cluster())
            write_items(
                source,
                (
                    (ID_PREFIX + key_of(i), identity_labels(SOURCE, i).encode() + SEQ + b"-1")
                    for i in range(args.keys)
                ),
            )
            source.close()
        cfg = pair_config(
            tmp / "mesh.toml",
            broker.url,
            src_k.url,
            dst_url["kvmesh"],
            sync_settings(args.sync),
        )
        kvmesh = [sys.executable, "-m", "pipeline"]
        spawn(procs, worker_command(cfg, args.concurrency, args.pool), tmp / "worker.log")
        spawn(procs, [*kvmesh, "watch", "--config", str(cfg)], tmp / "watch.log")
        # kvmesh's CPU, per put: lag on two busy cores moves a lot between runs, the CPU
        # each change costs far less, so it shows what a change to the code did
        sessions = {"watcher": procs[-1].pid, "workers": procs[-2].pid}
        contenders = {"kvmesh": Etcd(dst_k.cluster())}
        if not args.skip_mirror:
            spawn(
                procs,
                mirror_command(src_m.url, dst_url["make-mirror"]),
                tmp / "mirror.log",
                dict(os.environ, ETCDCTL_API="3"),
            )
            contenders["make-mirror"] = Etcd(dst_m.cluster())
        wait_for(
            "the workers",
            lambda: workers_ready(tmp / "worker.log", args.pool, args.concurrency),
            60,
            tmp / "worker.log",
            [*procs, *servers],
        )
        for name, etcd in contenders.items():
            wait_for(
                f"{name}'s initial copy",
                lambda e=etcd: e.count(CACHE_PREFIX) >= args.keys,
                120,
                None,
                [*procs, *servers],
            )
        arrivals = {name: Arrivals() for name in contenders}
        for name, etcd in contenders.items():
            streams.append(
                etcd.watch(
                    CACHE_PREFIX,
                    etcd.revision() + 1,
                    arrivals[name].on_events,
                    arrivals[name].on_error,
                )
            )
        results = []
        print(
            f"{'rate/s':>7} {'achieved':>9} {'contender':>12} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'max ms':>8} {'lost':>5} {'reordered':>9} {'cpu/put: watcher':>17} {'workers':>8}",
            flush=True,
        )

        def settled(name: str, last: dict[int, int], timeout: float) -> None:
            """Wait until every key's last put arrived (else it counts as lost)."""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                check_alive([*procs, *servers], f"{name}'s last puts")
                with arrivals[name].lock:
                    seen = arrivals[name].seen
                    if all(
                        seen.get(key_of(i)) and seen[key_of(i)][-1][0] >= seq
                        for i, seq in last.items()
                    ):
                        return
                time.sleep(0.05)  # poll interval

        first = 0
        for rnd in range(1, args.rounds + 1):
            for rate in args.rates:
                for name, etcd in contenders.items():
                    # one contender at a time, in its own source: the other's source is quiet
                    count = int(rate * args.seconds)
                    cpu = {k: session_cpu_seconds(sid) for k, sid in sessions.items()}
                    sent, elapsed = churn(sources[name], rate, count, first, args.keys)
                    seqs = range(first, first + count)
                    first += count
                    last = {i: seq for seq, i, _ in sent}
                    settled(name, last, 30)
                    cpu = {k: session_cpu_seconds(sid) - cpu[k] for k, sid in sessions.items()}
                    r = judge(arrivals[name], sent, args.keys, seqs)
                    trace = r.pop("trace")
                    if args.trace:
                        with open(args.trace, "a") as fh:
                            fh.writelines(f"{name} {rate} {t:.6f} {d:.3f}\n" for t, d in trace)
                    final = etcd.items(CACHE_PREFIX)
                    # lost: a key whose value in the target is not its last put
                    r["lost_keys"] = lost_keys(final, last)
                    r.update(
                        rate=rate,
                        achieved=round(len(sent) / max(elapsed, 1e-9)),
                        contender=name,
                        round=rnd,
                    )
                    if name == "kvmesh":
                        for k, seconds in cpu.items():
                            r[f"{k}_cpu_ms_per_put"] = round(seconds * 1000 / max(len(sent), 1), 3)
                    if args.delay or args.load:
                        r.update(delay_ms=args.delay * 1000, load_cores=args.load)
                    results.append(r)
                    print(
                        f"{rate:>7} {r['achieved']:>9} {name:>12} {r['p50_ms']:>8} "
                        f"{r['p99_ms']:>8} {r['max_ms']:>8} {r['lost_keys']:>5} "
                        f"{r['reordered_keys']:>9}"
                        + "".join(
                            f" {r[k]:>{w}}"
                            for k, w in (
                                ("watcher_cpu_ms_per_put", 17),
                                ("workers_cpu_ms_per_put", 8),
                            )
                            if k in r
                        ),
                        flush=True,
                    )
        for name, a in arrivals.items():
            if a.errors:
                print(f"{name}: watch errors: {a.errors[:3]}")
        if args.rounds > 1:
            print_medians(results)
        if args.json:
            write_json(results, args.json)
        if args.png:
            draw(results, args.png)
        return 0
    finally:
        for st in streams:
            st.stop()
        stop(procs)
        discard(*servers)


def link(
    procs: list[subprocess.Popen[bytes]],
    tmp: Path,
    name: str,
    target: EtcdServer,
    delay: float,
    servers: list[Watched],
) -> str:
    """Start a delay proxy in front of *target*; returns the URL to write through."""
    port = free_port()
    log = tmp / f"link-{name}.log"
    spawn(
        procs,
        [sys.executable, str(HERE / "delay_proxy.py"), str(port), str(target.port), str(delay)],
        log,
    )
    wait_for("the link", lambda: b"ready" in log.read_bytes(), 10, log, [*procs, *servers])
    return f"http://127.0.0.1:{port}"


def medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate and contender, over the rounds: each percentile's median, min and max."""
    out = []
    for (rate, name), group in itertools.groupby(
        sorted(results, key=lambda r: (r["rate"], r["contender"])),
        key=lambda r: (r["rate"], r["contender"]),
    ):
        rows = list(group)
        m: dict[str, Any] = {"rate": rate, "contender": name, "rounds": len(rows)}
        for k in ("p50_ms", "p99_ms", "max_ms"):
            vals = [r[k] for r in rows]
            m[k], m[k + "_range"] = round(statistics.median(vals), 2), (min(vals), max(vals))
        m["lost_keys"] = sum(r["lost_keys"] for r in rows)
        m["reordered_keys"] = sum(r["reordered_keys"] for r in rows)
        out.append(m)
    return out


def print_medians(results: list[dict[str, Any]]) -> None:
    print("over the rounds: median (min-max)")
    print(f"{'rate/s':>7} {'contender':>12} {'p50 ms':>22} {'p99 ms':>24} {'lost':>5} {'reord':>5}")
    for m in medians(results):
        p50 = "{} ({}-{})".format(m["p50_ms"], *m["p50_ms_range"])
        p99 = "{} ({}-{})".format(m["p99_ms"], *m["p99_ms_range"])
        print(
            f"{m['rate']:>7} {m['contender']:>12} {p50:>22} {p99:>24} "
            f"{m['lost_keys']:>5} {m['reordered_keys']:>5}"
        )


def draw(results: list[dict[str, Any]], png: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    summary = medians(results)
    rounds = max(m["rounds"] for m in summary)
    for name, color in (("kvmesh", "tab:blue"), ("make-mirror", "tab:orange")):
        rows = [m for m in summary if m["contender"] == name]
        if not rows:
            continue
        xs = [m["rate"] for m in rows]
        for k, style, what in (("p50_ms", "o-", "p50"), ("p99_ms", "s--", "p99")):
            ys = [m[k] for m in rows]
            # the range over the rounds, as error bars around the median
            err = [
                [y - m[k + "_range"][0] for y, m in zip(ys, rows, strict=True)],
                [m[k + "_range"][1] - y for y, m in zip(ys, rows, strict=True)],
            ]
            label = f"{name} {what}" + (f", median of {rounds}" if rounds > 1 else "")
            ax.errorbar(
                xs,
                ys,
                yerr=err if rounds > 1 else None,
                fmt=style,
                color=color,
                capsize=3,
                label=label,
            )
    if not results[0].get("delay_ms"):  # KVStoreMesh's figure is of loopback
        ax.axhline(19, color="grey", lw=0.8, ls=":", label="KVStoreMesh p99, unthrottled (19 ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    rates = sorted({r["rate"] for r in results})
    ax.set_xticks(rates, [str(r) for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("puts per second in the source")
    ax.set_ylabel("put → arrival in the target (ms)")
    ax.legend(fontsize=8)
    title = "Steady-state lag, 2 cores"
    delay, load = results[0].get("delay_ms", 0), results[0].get("load_cores", 0)
    if delay:
        title += f", a {2 * delay:g} ms round trip to the target"
    if load:
        title += f", {load:g} cores of load"
    ax.set_title(title, fontsize=10 if delay or load else None)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


if __name__ == "__main__":
    raise SystemExit(main())
