"""What a source change costs in broker messages and bytes as the mesh grows: runs the lab
(`kvmesh lab`: every cluster a source and a target, the simulator churning in each, 2
workers) at several sizes and reads, from its report, the tasks and task bytes published per
source change between the end of the initial sync and the end of the churn, the peak queue
depth and the peak `lag s`.

    python benchmarks/mesh_scale.py [--clusters 3 6 10 12] [--duration 40] [--png FILE]

A message count that grows with the number of clusters for the same changes is what made
large meshes fall behind: each flush used to be one task per target. `--code DIR` runs the
lab from another checkout, to compare two versions in one session (a version without the
task metrics prints no cost per change, only queues, lag and convergence).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_lab(clusters: int, duration: int, code: Path) -> dict[str, object]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "lab",
        "--clusters",
        str(clusters),
        "--identities",
        "300",
        "--duration",
        str(duration),
    ]
    out = subprocess.run(cmd, cwd=code, capture_output=True, text=True, timeout=1800).stdout
    text = " ".join(out.split())  # the report wraps long lines
    cost = re.search(
        r"broker cost per source change while churning: ([\d.]+) tasks, (\d+) bytes", text
    )
    queues = [int(q) for q in re.findall(r"kvmesh\.cluster-\d+=(\d+)", text)]
    lags = [
        float(x) for x in re.findall(r"cluster-\d+=([\d.]+)(?=[, ]|$)", text.split("peak lag")[-1])
    ]
    return {
        "clusters": clusters,
        "tasks_per_change": float(cost.group(1)) if cost else None,
        "bytes_per_change": int(cost.group(2)) if cost else None,
        "peak_queue": max(queues) if queues else None,
        "peak_lag_s": max(lags) if lags else None,
        "converged": "lab: converged" in text,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, nargs="+", default=[3, 6, 10, 12])
    ap.add_argument("--duration", type=int, default=40, help="seconds of churn per size")
    ap.add_argument("--png", default="", help="draw tasks and bytes per change to this file")
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout to run the lab from")
    args = ap.parse_args()
    rows = []
    print(
        f"{'clusters':>8} {'tasks/change':>13} {'bytes/change':>13} {'peak queue':>11} "
        f"{'peak lag s':>11} converged",
        flush=True,
    )
    for n in args.clusters:
        r = run_lab(n, args.duration, args.code)
        rows.append(r)
        print(
            f"{n:>8} {r['tasks_per_change']!s:>13} {r['bytes_per_change']!s:>13} "
            f"{r['peak_queue']!s:>11} {r['peak_lag_s']!s:>11} {r['converged']}",
            flush=True,
        )
    if args.png:
        try:
            import matplotlib
        except ImportError:
            raise SystemExit(
                "--png needs matplotlib: .venv/bin/pip install -e '.[bench]'"
            ) from None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if r["tasks_per_change"] is not None]
        xs = [r["clusters"] for r in ok]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(xs, [r["tasks_per_change"] for r in ok], "o-")
        a.set_xlabel("clusters in the mesh")
        a.set_ylabel("tasks per source change")
        b.plot(xs, [r["bytes_per_change"] for r in ok], "o-")
        b.set_xlabel("clusters in the mesh")
        b.set_ylabel("task bytes per source change")
        fig.suptitle("kvmesh lab, 20 ops/s churn per cluster, 2 workers, 2 cores")
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
