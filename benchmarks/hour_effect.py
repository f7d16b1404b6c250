"""How much of the two ratio goals the machine's hour decides: reads the runs already in
`docs/bench/` (or the files given) and sets each ratio against a measure of how slow the
machine was during that run, taken in the same run and not made by kvmesh's code.

- **Initial sync** (`initial_sync*.json`): the ratio kvmesh / make-mirror against two
  measures, one for each side of it. kvmesh is bound by CPU: its measure is the CPU
  seconds the *target etcd* spent on that run's 50,000 puts, the same etcd doing the same
  work (transactions of up to 127 puts) in every run, so it moves with the machine's
  speed and not with the product. make-mirror is bound by round trips, one key at a time:
  its own time is its measure. The picture draws kvmesh's time against make-mirror's,
  with the goal's line.
- **Worker scaling** (`scale_workers*.json`): four prefork slots against one
  (`backlog_vs_first`) against the CPU a sleeping thread was charged per wake-up during
  that four-slot backlog (`backlog_wake_us`, benchcommon.WakeProbe): what a wait costs in
  that hour.

Files of trials in another format (whose runs are not a plain list), runs of products
with uncommitted changes (`+changes`) and rounds on links other than the normal one are
left out. For the four-slot rounds it also prints the bare writers' ratio and kvmesh's
backlog pace as a share of the bare writers' pace, at four slots and at one (the
one-slot run of the same round), over the rounds that record the wake-up's cost. Products differ
between files; their changes to the CPU per key were small against the hour's
(performance-log.md), and `--mark COMMIT ...` draws chosen products' runs apart.

    python benchmarks/hour_effect.py [FILE ...] [--png FILE] [--mark COMMIT ...]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchcommon import pyplot

INF = float("inf")

ROOT = Path(__file__).resolve().parent.parent
ETCD_CPU_BINS = [0.0, 0.7, 0.85, 1.0, INF]  # the target etcd's CPU seconds for 50,000 puts
MIRROR_BINS = [0.0, 15.0, 18.0, 21.0, INF]  # make-mirror's seconds
WAKE_BINS = [0.0, 25.0, 30.0, 35.0, INF]  # CPU per wake-up, µs
INITIAL_GOAL = 0.1  # kvmesh at most 0.1 of make-mirror's time
SCALE_GOAL = 3.5  # four slots at least 3.5 times one


@dataclass
class InitialRun:
    etcd_cpu: float  # the target etcd's CPU seconds
    kvmesh_s: float
    mirror_s: float
    ratio: float
    product: str


@dataclass
class ScaleRun:
    wake_us: float  # CPU per wake-up during the four-slot backlog
    ratio: float  # four slots against one slot of the same round
    product: str
    bare_ratio: float  # the bare writers' four against one, in the same round
    pace4: float  # kvmesh's backlog writes/s over the bare writers', at four slots
    pace1: float | None  # the same at one slot of that round, if the file has it


def _runs(path: str) -> tuple[list[dict[str, Any]], str]:
    """The runs of a benchmark JSON and the file's product (from its provenance), or no
    runs for a trial's file in another format."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return [], ""
    runs = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(runs, list):
        return [], ""
    prov = data.get("provenance") if isinstance(data, dict) else None
    product = str(prov.get("product", "")) if isinstance(prov, dict) else ""
    return [r for r in runs if isinstance(r, dict)], product


def _num(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) for v in values)


def _product(r: dict[str, Any], default: str) -> str:
    """A run's own product where its row records it (a file may hold several)."""
    prov = r.get("provenance")
    return str(prov.get("product", default)) if isinstance(prov, dict) else default


def collect(files: list[str]) -> tuple[list[InitialRun], list[ScaleRun]]:
    initial: list[InitialRun] = []
    scale: list[ScaleRun] = []
    for path in files:
        runs, file_product = _runs(path)
        name = Path(path).name
        for r in runs:
            product = _product(r, file_product)
            if "+" in product:
                continue
            if name.startswith("initial_sync"):
                cpu = (r.get("kvmesh_cpu_s") or {}).get("target etcd")
                k, m, ratio = r.get("kvmesh_s"), r.get("make_mirror_s"), r.get("ratio")
                if _num(cpu, k, m, ratio):
                    initial.append(InitialRun(cpu, k, m, ratio, product))
            elif name.startswith("scale_workers"):
                run = _scale_run(r, runs, product)
                if run is not None:
                    scale.append(run)
    return initial, scale


def _pace(r: dict[str, Any]) -> float | None:
    k, b = r.get("backlog_keys_per_s"), r.get("bare_keys_per_s")
    return k / b if _num(k, b) and b else None


def _prefork_normal(r: dict[str, Any], slots: int) -> bool:
    """A run of *slots* prefork slots on the normal link."""
    return (
        r.get("slots") == slots
        and r.get("pool", "prefork") == "prefork"
        and r.get("link", "normal") == "normal"
    )


def _scale_run(r: dict[str, Any], runs: list[dict[str, Any]], product: str) -> ScaleRun | None:
    """A four-slot prefork run on the normal link, with the one-slot run of its round:
    scale_workers.py stamps the rows of a round with one provenance, its time included."""
    if not _prefork_normal(r, 4):
        return None
    wake, ratio, bare = r.get("backlog_wake_us"), r.get("backlog_vs_first"), r.get("bare_vs_first")
    pace4 = _pace(r)
    if not _num(wake, ratio, bare) or pace4 is None:
        return None
    same_round = (r.get("round"), r.get("provenance"))
    ones = [
        o
        for o in runs
        if _prefork_normal(o, 1) and (o.get("round"), o.get("provenance")) == same_round
    ]
    pace1 = _pace(ones[0]) if len(ones) == 1 else None
    return ScaleRun(wake, ratio, product, bare, pace4, pace1)


def table(
    title: str, unit: str, pts: list[tuple[float, float]], bins: list[float], met: Any
) -> None:
    """*pts* are (measure, ratio): per bin of the measure, the runs, how many met the goal,
    and the median and range of the ratio."""
    print(title)
    print(f"  {unit:<24} runs  goal met  median ratio  range")
    for lo, hi in itertools.pairwise(bins):
        rs = [r for m, r in pts if lo <= m < hi]
        label = f"{lo:g}-{hi:g}" if hi != INF else f"{lo:g} and more"
        if not rs:
            print(f"  {label:<24} {0:>4}")
            continue
        print(
            f"  {label:<24} {len(rs):>4}  {sum(1 for r in rs if met(r)):>8}"
            f"  {statistics.median(rs):>12.3f}  {min(rs):.3f}-{max(rs):.3f}"
        )


def draw(initial: list[InitialRun], scale: list[ScaleRun], marks: list[str], png: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = [("other products", "0.65", lambda p: p not in marks)] + [
        (m, f"C{i}", lambda p, m=m: p == m) for i, m in enumerate(marks)
    ]
    for label, color, pick in groups:
        xs = [(r.mirror_s, r.kvmesh_s) for r in initial if pick(r.product)]
        if xs:
            a.scatter(*zip(*xs, strict=True), s=18, color=color, label=label)
        ys = [(r.wake_us, r.ratio) for r in scale if pick(r.product)]
        if ys:
            b.scatter(*zip(*ys, strict=True), s=18, color=color, label=label)
    lo, hi = a.get_xlim()
    a.plot(
        [lo, hi],
        [INITIAL_GOAL * lo, INITIAL_GOAL * hi],
        "k--",
        linewidth=0.8,
        label="goal: 0.1 of make-mirror",
    )
    a.set_xlim(lo, hi)
    a.set_xlabel("make-mirror (s)")
    a.set_ylabel("kvmesh (s); below the line meets the goal")
    a.set_title("initial sync of 50,000 identities, each run")
    b.axhline(SCALE_GOAL, color="k", linestyle="--", linewidth=0.8, label="goal: 3.5")
    b.set_xlabel("CPU per wake-up during the four-slot backlog (µs)")
    b.set_ylabel("four slots / one slot; above the line meets the goal")
    b.set_title("worker scaling through a 10 ms round trip, each round")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="benchmark JSONs (default: docs/bench/)")
    ap.add_argument("--png", default="", help="draw both scatters into this file")
    ap.add_argument("--mark", nargs="*", default=[], help="products to draw apart")
    args = ap.parse_args()
    files = args.files or sorted(
        glob.glob(str(ROOT / "docs/bench/initial_sync*.json"))
        + glob.glob(str(ROOT / "docs/bench/scale_workers*.json"))
    )
    initial, scale = collect(files)
    at_most, at_least = (lambda r: r <= INITIAL_GOAL), (lambda r: r >= SCALE_GOAL)
    for title, unit, pts, bins, met in (
        (
            "initial sync, kvmesh / make-mirror, by the target etcd's CPU (kvmesh's side)",
            "target etcd CPU (s)",
            [(r.etcd_cpu, r.ratio) for r in initial],
            ETCD_CPU_BINS,
            at_most,
        ),
        (
            "initial sync, kvmesh / make-mirror, by make-mirror's time (the baseline's side)",
            "make-mirror (s)",
            [(r.mirror_s, r.ratio) for r in initial],
            MIRROR_BINS,
            at_most,
        ),
        (
            "four prefork slots / one, by the CPU per wake-up during the four-slot backlog",
            "CPU per wake-up (µs)",
            [(r.wake_us, r.ratio) for r in scale],
            WAKE_BINS,
            at_least,
        ),
    ):
        table(title, unit, pts, bins, met)
    paired = [r for r in scale if r.pace1]
    print(
        "four prefork slots: kvmesh's backlog pace against the bare writers' of the same run,"
        f" median (range), {len(scale)} rounds"
    )
    for label, values, goal in (
        ("the bare writers' four against one", [r.bare_ratio for r in scale], True),
        ("kvmesh's pace / bare, four slots", [r.pace4 for r in scale], False),
        (f"the same, one slot ({len(paired)} rounds)", [r.pace1 or 0.0 for r in paired], False),
        ("four-slot / one-slot pace", [r.pace4 / (r.pace1 or 1.0) for r in paired], False),
    ):
        if not values:
            continue
        under = f", under 3.5 in {sum(v < SCALE_GOAL for v in values)}" if goal else ""
        print(
            f"  {label:<38} {statistics.median(values):.3f}"
            f" ({min(values):.3f}-{max(values):.3f}){under}"
        )
    if args.png:
        draw(initial, scale, args.mark, args.png)


if __name__ == "__main__":
    main()
