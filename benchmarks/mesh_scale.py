"""What a source change costs in broker messages and bytes as the mesh grows: runs the lab
(`kvmesh lab`: every cluster a source and a target, the simulator churning in each, 2
workers) at several sizes and reads, from its report, what the watchers published per
source change between the end of the initial sync and the end of the churn: tasks, payload
bytes, and every byte written to Redis for them (each message with Celery's envelope, and
payloads stored by reference). It also reads the peak queue depth, the peak `lag s`, the
time the initial sync took and the time to converge after the churn stopped, and samples
the resident memory of the watchers and of the worker pool.

    python benchmarks/mesh_scale.py [--clusters 3 6 10] [--duration 40]
        [--json FILE] [--png FILE] [--code DIR] [--before FILE] [--redraw FILE]

A message count that grows with the number of clusters for the same changes is what made
large meshes fall behind: each flush used to be one task per target. `--code DIR` runs the
lab from another checkout, to compare two versions in one session (a version without the
task metrics prints no cost per change, only queues, lag and convergence; one from before
2026-11-29 no bytes written to Redis); `--before FILE` draws the JSON of such a run next to
this one, and `--redraw FILE` only draws the picture of a run's JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchcommon import byte_compile, code_env, pyplot, write_json

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def _tree(root: int) -> dict[int, str]:
    """Every live descendant of *root*: pid → command line."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmds[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmds.get(child, "")
                frontier.append(child)
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class MemorySampler(threading.Thread):
    """The peak RSS of one watcher process, and of the worker pool (its main process and
    its children together), sampled every 2 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.watcher = 0
        self.workers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(2.0):
            tree = _tree(self.root)
            watchers = [_rss(p) for p, c in tree.items() if " watch " in f" {c} "]
            pool = [_rss(p) for p, c in tree.items() if "celery" in c or " worker " in f" {c} "]
            self.watcher = max([self.watcher, *watchers])
            self.workers = max(self.workers, sum(pool))


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
    # PYTHONPATH, not only the working directory: the lab starts its watchers and workers
    # in its data directory, where `-m pipeline` would find the venv's checkout instead.
    # (Until 2026-11-29 it did: a --code run compared only the labs, with the same
    # watchers and workers on both sides.)
    proc = subprocess.Popen(cmd, cwd=code, env=code_env(code), stdout=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate(timeout=1800)
    sampler.stop.set()
    text = " ".join(out.split())  # the report wraps long lines
    cost = re.search(
        r"broker cost per source change while churning: ([\d.]+) tasks, (\d+) bytes", text
    )
    # the bytes written with the messages' envelopes: reported by versions from 2026-11-29 on
    written = re.search(r"written to Redis with the messages' envelopes: (\d+) bytes", text)
    queues = [int(q) for q in re.findall(r"kvmesh\.cluster-\d+=(\d+)", text)]
    lags = [
        float(x) for x in re.findall(r"cluster-\d+=([\d.]+)(?=[, ]|$)", text.split("peak lag")[-1])
    ]
    synced = re.search(r"initial sync: every source in every target ([\d.]+) s", text)
    converged = re.search(r"lab: converged(?: ([\d.]+) s after the churn stopped)?", text)
    return {
        "clusters": clusters,
        "tasks_per_change": float(cost.group(1)) if cost else None,
        "bytes_per_change": int(cost.group(2)) if cost else None,
        "broker_bytes_per_change": int(written.group(1)) if written else None,
        "peak_queue": max(queues) if queues else None,
        "peak_lag_s": max(lags) if lags else None,
        "initial_sync_s": float(synced.group(1)) if synced else None,
        "converged": converged is not None,
        "converge_s": float(converged.group(1)) if converged and converged.group(1) else None,
        "watcher_rss_mib": round(sampler.watcher / 2**20, 1),
        "workers_rss_mib": round(sampler.workers / 2**20, 1),
    }


COLUMNS = [
    ("clusters", 8),
    ("tasks_per_change", 16),
    ("bytes_per_change", 16),
    ("broker_bytes_per_change", 23),
    ("peak_queue", 10),
    ("peak_lag_s", 10),
    ("initial_sync_s", 14),
    ("converge_s", 10),
    ("watcher_rss_mib", 15),
    ("workers_rss_mib", 15),
    ("converged", 9),
]


def draw(rows: list[dict[str, object]], before: list[dict[str, object]], png: str) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for series, label, style in ((before, "before", "s--"), (rows, "now", "o-")):
        ok = [r for r in series if r.get("tasks_per_change") is not None]
        if not ok:
            continue
        xs = [r["clusters"] for r in ok]
        a.plot(xs, [r["tasks_per_change"] for r in ok], style, label=label)
        b.plot(xs, [r["bytes_per_change"] for r in ok], style, label=f"{label}: payloads")
        wire = [r for r in ok if r.get("broker_bytes_per_change") is not None]
        if wire:
            b.plot(
                [r["clusters"] for r in wire],
                [r["broker_bytes_per_change"] for r in wire],
                style.replace("o", "^"),
                label=f"{label}: written to Redis, with envelopes",
            )
    a.set_xlabel("clusters in the mesh")
    a.set_ylabel("tasks per source change")
    b.set_xlabel("clusters in the mesh")
    b.set_ylabel("bytes per source change")
    if before:
        a.legend()
    b.legend(fontsize="small")
    a.set_ylim(bottom=0)
    b.set_ylim(bottom=0)
    fig.suptitle("kvmesh lab, 20 ops/s churn per cluster, 2 workers, 2 cores")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--clusters", type=int, nargs="+", default=[3, 6, 10])
    ap.add_argument("--duration", type=int, default=40, help="seconds of churn per size")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--png", default="", help="draw tasks and bytes per change to this file")
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout to run the lab from")
    ap.add_argument("--before", default="", help="a JSON file of an earlier run to draw too")
    ap.add_argument("--redraw", default="", help="only draw --png from this JSON of a run")
    args = ap.parse_args()
    byte_compile(args.code)
    if args.redraw:
        before = json.loads(Path(args.before).read_text()) if args.before else []
        draw(json.loads(Path(args.redraw).read_text()), before, args.png)
        return 0
    rows = []
    print(" ".join(f"{name:>{width}}" for name, width in COLUMNS), flush=True)
    for n in args.clusters:
        started = time.monotonic()
        r = run_lab(n, args.duration, args.code)
        r["wall_s"] = round(time.monotonic() - started, 1)
        rows.append(r)
        print(" ".join(f"{r[name]!s:>{width}}" for name, width in COLUMNS), flush=True)
    if args.json:
        write_json(rows, args.json, args.code)
    if args.png:
        before = json.loads(Path(args.before).read_text()) if args.before else []
        draw(rows, before, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
