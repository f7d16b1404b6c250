"""Peak memory of one watcher process against the size of its source: identity ID keys,
50k and 500k by default, on a first sync (the target is empty) and on a resync against a
target that already holds every key (the diff finds nothing to send).

    python benchmarks/watcher_memory.py [--keys 50000 500000] [--code DIR]

Each case gets fresh etcds and a fresh Redis. The watcher is `kvmesh watch` in a process of
its own, with no worker running: publishing is all it does besides listing, so its peak RSS
(VmHWM, read from /proc when its snapshot is published) is what the listing, the diff and
the batching cost. --code runs the watcher from another checkout, to compare two versions
on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchcommon import code_env, discard

from pipeline.clients.etcd import Etcd
from pipeline.tools.cilium_state import identity_id, identity_labels, write_items
from pipeline.tools.meshconfig import mesh_config, new_signing_key, write_secret
from pipeline.tools.orphan import wrap
from pipeline.tools.servers import EtcdServer, RedisServer, free_port

SOURCE = "cluster-a"
ID_PREFIX = b"cilium/state/identities/v1/id/"
CACHE_PREFIX = f"cilium/cache/identities/v1/{SOURCE}/id/".encode()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} for pid {pid}")


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples from the watcher's endpoint at *port* (0 while it is
    not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def resyncs(port: int) -> float:
    return metric(port, "kvmesh_watcher_resyncs_total")


def fresh_servers(tmp: Path) -> tuple[EtcdServer, EtcdServer, RedisServer]:
    """A source etcd, a target etcd and Redis, started in *tmp* (all stopped if one fails)."""
    servers = (EtcdServer(tmp / "source"), EtcdServer(tmp / "target"), RedisServer(tmp / "redis"))
    try:
        for s in servers:
            s.start()
    except BaseException:
        discard(*servers)
        raise
    return servers


def spawn_watcher(code: Path, cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """`kvmesh watch` of the checkout *code* in a process of its own, its output in *log*."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            wrap([sys.executable, "-m", "pipeline", "watch", "--config", str(cfg)]),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=code,
            env=code_env(code),
        )


def run_case(keys: int, prefilled: bool, code: Path, tmp: Path, timeout: float) -> dict[str, float]:
    src, dst, broker = servers = fresh_servers(tmp)
    watcher: subprocess.Popen[bytes] | None = None
    try:
        items = [
            (ID_PREFIX + str(identity_id(1, i)).encode(), identity_labels(SOURCE, i).encode())
            for i in range(keys)
        ]
        write_items(Etcd(src.cluster()), items)
        if prefilled:  # what an earlier sync left: the same keys, the same values
            write_items(
                Etcd(dst.cluster()), ((CACHE_PREFIX + k[len(ID_PREFIX) :], v) for k, v in items)
            )
        del items
        port = free_port()
        cfg = tmp / "mesh.toml"
        cfg.write_text(
            mesh_config(
                broker_url=broker.url,
                signing_key_file=write_secret(tmp / "signing.key", new_signing_key()),
                clusters=[
                    {"name": SOURCE, "id": 1, "endpoints": [src.url], "target": False},
                    {"name": "cluster-b", "id": 2, "endpoints": [dst.url], "source": False},
                ],
                sync={"max_queue_depth": 1_000_000},
            )
            + f"\n[metrics]\nwatcher_port = {port}\n"
        )
        watcher = spawn_watcher(code, cfg, tmp / "watch.log")
        t0 = time.monotonic()
        while resyncs(port) < 1:
            if watcher.poll() is not None or time.monotonic() - t0 > timeout:
                tail = (tmp / "watch.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"the watcher did not finish its snapshot:\n{tail}")
            time.sleep(0.2)  # poll interval
        elapsed = time.monotonic() - t0
        return {
            "peak_mib": status_kib(watcher.pid, "VmHWM") / 1024,
            "rss_mib": status_kib(watcher.pid, "VmRSS") / 1024,
            "seconds": elapsed,
        }
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(30)
        discard(*servers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[50_000, 500_000])
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    print(f"watcher code: {args.code}")
    print(f"{'keys':>8}  {'case':<25} {'peak RSS':>10} {'RSS at end':>11} {'time':>8}")
    peaks: dict[tuple[int, bool], float] = {}
    for keys in args.keys:
        for prefilled in (False, True):
            tmp = Path(tempfile.mkdtemp(prefix="kvmesh-mem-"))
            r = run_case(keys, prefilled, args.code, tmp, args.timeout)
            peaks[(keys, prefilled)] = r["peak_mib"]
            case = "resync, target full" if prefilled else "first sync, target empty"
            print(
                f"{keys:>8}  {case:<25} {r['peak_mib']:>7.1f} MiB {r['rss_mib']:>7.1f} MiB"
                f" {r['seconds']:>6.1f} s",
                flush=True,
            )
    if len(args.keys) >= 2:
        lo, hi = min(args.keys), max(args.keys)
        for prefilled in (False, True):
            case = "resync" if prefilled else "first sync"
            growth = peaks[(hi, prefilled)] - peaks[(lo, prefilled)]
            print(f"growth {lo} -> {hi} keys, {case}: {growth:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
