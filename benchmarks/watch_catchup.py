"""Peak memory of a watcher that catches up on a long history of large values: the watcher
is paused (SIGSTOP) while the source writes N values of S bytes, one revision each, then
resumed. etcd then sends the history it missed in responses of up to a thousand revisions
(in fragments of its request limit); what the watcher holds at once while it takes them in
is what this measures.

    python benchmarks/watch_catchup.py [--values 300] [--size 900000] [--code DIR ...]

The watcher is `kvmesh watch` in a process of its own, with no worker: it publishes what it
took (payloads by reference, into Redis) and nothing applies them. Its peak RSS (VmHWM) is
read before the pause and once every change is published (kvmesh_watcher_ops_published_total).
Each --code runs the watcher from that checkout, on fresh servers, in the order given, so
two versions are compared in one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchcommon import SOURCE, discard, pair_config
from watcher_memory import fresh_servers, metric, spawn_watcher, status_kib

from pipeline.clients.etcd import Etcd
from pipeline.tools.servers import free_port

PREFIX = f"cilium/state/services/v1/{SOURCE}/".encode()


def wait(
    what: str,
    check: Callable[[], bool],
    watcher: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
) -> None:
    t0 = time.monotonic()
    while not check():
        if watcher.poll() is not None or time.monotonic() - t0 > timeout:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"watch_catchup: {what} did not happen:\n{tail}")
        time.sleep(0.2)  # poll interval


def run_case(code: Path, values: int, size: int, tmp: Path, timeout: float) -> dict[str, float]:
    src, dst, broker = servers = fresh_servers(tmp)
    watcher: subprocess.Popen[bytes] | None = None
    try:
        source = Etcd(src.cluster())
        source.put(PREFIX + b"first", b"{}")
        port = free_port()
        # nothing applies the tasks: the queue must not pause publishing, and the pause must
        # not cost the leader lease
        sync = {"max_queue_depth": 1_000_000, "leader_ttl": 600}
        cfg = pair_config(tmp / "mesh.toml", broker.url, src.url, dst.url, sync)
        cfg.write_text(cfg.read_text() + f"\n[metrics]\nwatcher_port = {port}\n")
        log = tmp / "watch.log"
        watcher = spawn_watcher(code, cfg, log)
        w = watcher
        wait(
            "the first snapshot",
            lambda: metric(port, "kvmesh_watcher_resyncs_total") >= 1,
            w,
            log,
            timeout,
        )
        published = metric(port, "kvmesh_watcher_ops_published_total")
        before = status_kib(w.pid, "VmHWM") / 1024
        os.kill(w.pid, signal.SIGSTOP)
        value = b"v" * size
        for i in range(values):
            source.put(PREFIX + b"big-%05d" % i, value)
        source.close()
        t0 = time.monotonic()
        os.kill(w.pid, signal.SIGCONT)
        wait(
            "the catch-up",
            lambda: metric(port, "kvmesh_watcher_ops_published_total") >= published + values,
            w,
            log,
            timeout,
        )
        return {
            "peak_before_mib": before,
            "peak_mib": status_kib(w.pid, "VmHWM") / 1024,
            "seconds": time.monotonic() - t0,
            "resyncs": metric(port, "kvmesh_watcher_resyncs_total"),
        }
    finally:
        if watcher is not None:
            os.kill(watcher.pid, signal.SIGCONT)
            watcher.terminate()
            watcher.wait(30)
        discard(*servers)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--values", type=int, default=300)
    ap.add_argument("--size", type=int, default=900_000)
    ap.add_argument(
        "--code", type=Path, nargs="+", default=[Path(__file__).resolve().parent.parent]
    )
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    mb = args.values * args.size / 1e6
    print(
        f"{args.values} values of {args.size} bytes ({mb:.0f} MB), written while the watcher "
        "was paused"
    )
    print(
        f"{'watcher code':<40} {'peak before':>12} {'peak after':>11} {'catch-up':>9} "
        f"{'resyncs':>8}"
    )
    for code in args.code:
        tmp = Path(tempfile.mkdtemp(prefix="kvmesh-catchup-"))
        r = run_case(code, args.values, args.size, tmp, args.timeout)
        print(
            f"{code!s:<40} {r['peak_before_mib']:>8.1f} MiB {r['peak_mib']:>7.1f} MiB"
            f" {r['seconds']:>7.1f} s {r['resyncs']:>8.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
