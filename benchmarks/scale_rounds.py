"""The rounds of `scale_workers.py` runs, side by side: each round's ratio of N slots to the
round's first count, against the CPU every part spent per write in the two runs it compares.

    python benchmarks/scale_rounds.py FILE... [--slots 4] [--pool prefork] [--goal 3.5]
        [--exclude 'FILE:RUN pattern'] [--cores N]

Each FILE is a JSON file `scale_workers.py --json` wrote (a list of runs), or an object
whose "runs" hold such lists by name (the files of paired experiments in docs/bench; a
list is then named FILE:RUN, which `--exclude` matches). A round is the runs of one pool
(and series, where a list holds several) with one `round` number in one list; its first
run is its smallest slot count.

For every round it prints the backlog's ratio and the bare writers', the backlog's writes
per second at both counts, kvmesh against the bare writers at N slots, and the CPU spent
while the backlog drained: the target etcd's per write (at both counts), the delay
proxy's, the worker's (per task and per write) and the whole machine's (the cores a run's
`provenance` records, else `--cores`, this machine's by default), and, for runs since
benchcommon.WakeProbe, the CPU a 12 ms sleep cost while the backlog drained. Then, for the
rounds under `--goal` and the others, the median of each figure, and its rank correlation
with the ratio.

The target etcd and the proxy do the same work for a write in every round, so their CPU per
write moving from round to round would show cores that ran slower or faster (a shared VM's
do while a neighbour is busy). It is not a clean probe: both also spend less per write the
more transactions arrive at once (the target etcd at one slot spends about 1.6 times what
it does at four), so a round that is slow for another reason shows some of it too.

Files from before the bare baseline (2026-11-29, late) lack its fields; their runs are
skipped, and said to be.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any


def runs_of(path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """The lists of runs in *path*, each with its name: FILE, or FILE:RUN for the lists
    under "runs"."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: {exc}") from None
    if isinstance(data, list):
        return [(path.name, data)]
    runs = data.get("runs", {}) if isinstance(data, dict) else {}
    named = runs.items() if isinstance(runs, dict) else enumerate(runs)
    return [(f"{path.name}:{k}", v) for k, v in named if isinstance(v, list)]


# what a run must hold to be read (scale_workers.py since the bare baseline, 2026-11-29)
NEEDED = (
    "pool",
    "slots",
    "backlog_s",
    "backlog_keys_per_s",
    "backlog_target_etcd_core_pct",
    "backlog_proxy_core_pct",
    "backlog_cpu_busy_pct",
    "backlog_worker_cpu_ms_per_task",
    "backlog_tasks",
    "bare_keys_per_s",
)


def rounds_of(runs: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The runs of one list by round: (series, pool, round), the series of files that hold
    several in one list."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((r.get("series"), r["pool"], r.get("round")), []).append(r)
    return out


def writes(run: dict[str, Any]) -> float:
    """The backlog's writes: its rate over its time."""
    return float(run["backlog_keys_per_s"] * run["backlog_s"])


def per_1000(run: dict[str, Any], pct_of_core: float) -> float:
    """Milliseconds of CPU per 1,000 writes (microseconds per write) while the backlog
    drained, for what used *pct_of_core* percent of a core over the time it was measured
    (until the workers' count said done)."""
    seconds = run["backlog_s"] + run.get("backlog_count_late_s", 0)
    return pct_of_core / 100 * seconds / writes(run) * 1e6


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share the mean of their ranks
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """The rank correlation of *xs* and *ys* (nan if either has fewer than two values)."""
    rx, ry = ranks(xs), ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return float("nan")
    return statistics.correlation(rx, ry)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--pool", default="", help="only this pool (default: every pool)")
    ap.add_argument("--goal", type=float, default=3.5, help="the ratio the rounds are split at")
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out the lists named so (FILE, or FILE:RUN), shell-style; repeatable",
    )
    ap.add_argument(
        "--cores",
        type=int,
        default=os.cpu_count() or 1,
        help="of the machine, for runs whose JSON does not say (before their provenance)",
    )
    args = ap.parse_args()
    rows, skipped, unpaired = [], 0, 0
    for path in args.files:
        for name, runs in runs_of(path):
            if any(fnmatch.fnmatch(name, pattern) for pattern in args.exclude):
                continue
            readable = [r for r in runs if all(k in r for k in NEEDED)]
            skipped += len(runs) - len(readable)
            for (_, pool, _), rs in rounds_of(readable).items():
                if args.pool and pool != args.pool:
                    continue
                first = [r for r in rs if r["slots"] == min(x["slots"] for x in rs)]
                at_n = [r for r in rs if r["slots"] == args.slots]
                if len(first) != 1 or len(at_n) != 1 or first == at_n:
                    unpaired += len(at_n)
                    continue
                rows.append(round_of(name, first[0], at_n[0], args.cores))
    if skipped:
        print(f"skipped {skipped} runs without the fields of {', '.join(NEEDED)}")
    if unpaired:
        print(f"skipped {unpaired} runs at {args.slots} slots without one first run in a round")
    if not rows:
        raise SystemExit(f"no round with {args.slots} slots in {', '.join(map(str, args.files))}")
    rows.sort(key=lambda r: r["ratio"])
    print(f"{'list':52} {'pool':8} {'round':>5} {'ratio':>6} {'bare':>6}", end="")
    print("".join(f" {k:>{w}}" for k, w, _ in COLUMNS))
    for r in rows:
        print(
            f"{r['file'][-52:]:52} {r['pool']:8} {r['round']!s:>5} {r['ratio']:6.2f} "
            f"{r['bare']:6.2f}",
            end="",
        )
        print("".join(f" {r[k]:{w}.{d}f}" for k, w, d in COLUMNS))
    ratios = [r["ratio"] for r in rows]
    under = [r for r in rows if r["ratio"] < args.goal]
    print(
        f"\n{len(rows)} rounds at {args.slots} slots: median ratio "
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
        f"{len(under)} under {args.goal}"
    )
    print(f"{'median of':44} {'under ' + str(args.goal):>10} {'the others':>10} {'rank corr.':>10}")
    for key, _, _ in COLUMNS:
        # a figure older runs lack (nan) counts over the rounds that have it
        has = [r for r in rows if not math.isnan(r[key])]
        low = [r[key] for r in has if r["ratio"] < args.goal]
        high = [r[key] for r in has if r["ratio"] >= args.goal]
        print(
            f"{LABELS[key]:44} "
            + (f"{statistics.median(low):10.2f} " if low else f"{'-':>10} ")
            + (f"{statistics.median(high):10.2f} " if high else f"{'-':>10} ")
            + f"{spearman([r['ratio'] for r in has], [r[key] for r in has]):+10.2f}"
            + (f"  ({len(has)} rounds)" if len(has) < len(rows) else "")
        )


# the figures of a round: (key, width, decimals)
COLUMNS = (
    ("first", 8, 0),
    ("n", 8, 0),
    ("vs_bare", 7, 2),
    ("etcd_first", 10, 1),
    ("etcd_n", 7, 1),
    ("proxy_n", 7, 1),
    ("cpu_task", 8, 1),
    ("worker_w", 8, 1),
    ("machine", 8, 1),
    ("wake_first", 10, 1),
    ("wake_n", 7, 1),
)
LABELS = {
    "first": "writes/s, first count",
    "n": "writes/s, N slots",
    "vs_bare": "kvmesh / bare writers at N",
    "etcd_first": "target etcd, CPU ms per 1,000 writes, first",
    "etcd_n": "target etcd, CPU ms per 1,000 writes, N",
    "proxy_n": "delay proxy, CPU ms per 1,000 writes, N",
    "cpu_task": "worker CPU per task at N, ms",
    "worker_w": "worker CPU per write at N, µs",
    "machine": "machine CPU per write at N, µs",
    "wake_first": "CPU per 12 ms sleep, first count, µs",
    "wake_n": "CPU per 12 ms sleep at N, µs",
}


def round_of(name: str, first: dict[str, Any], run: dict[str, Any], cores: int) -> dict[str, Any]:
    """The figures of one round: its first count's run and its N-slot run."""
    return {
        "file": name,
        "pool": run["pool"],
        "round": run.get("round"),
        "ratio": round(run["backlog_keys_per_s"] / first["backlog_keys_per_s"], 2),
        "bare": round(run["bare_keys_per_s"] / first["bare_keys_per_s"], 2),
        "first": first["backlog_keys_per_s"],
        "n": run["backlog_keys_per_s"],
        "vs_bare": run["backlog_keys_per_s"] / run["bare_keys_per_s"],
        "etcd_first": per_1000(first, first["backlog_target_etcd_core_pct"]),
        "etcd_n": per_1000(run, run["backlog_target_etcd_core_pct"]),
        "proxy_n": per_1000(run, run["backlog_proxy_core_pct"]),
        "cpu_task": run["backlog_worker_cpu_ms_per_task"],
        "worker_w": run["backlog_worker_cpu_ms_per_task"]
        * run["backlog_tasks"]
        / writes(run)
        * 1e3,
        # every process of the machine, every core (as the run recorded them, since
        # its JSON carries its provenance)
        "machine": per_1000(
            run, run["backlog_cpu_busy_pct"] * run.get("provenance", {}).get("cores", cores)
        ),
        # what a wait cost the machine while the backlog drained (runs since WakeProbe)
        "wake_first": first.get("backlog_wake_us", math.nan),
        "wake_n": run.get("backlog_wake_us", math.nan),
    }


if __name__ == "__main__":
    main()
