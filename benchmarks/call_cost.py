"""What a blocking wait and one etcd call cost a process's CPU on this machine.

    python benchmarks/call_cost.py [--calls 500] [--repeat 3] [--delay 0.005] [--json FILE]
    python benchmarks/call_cost.py --code-only [--repeat 3] [--json FILE]

Three measurements, printed as they come and as medians:

- **the worker's code alone**: per write, on a signed task of four full batches of one
  shard each (127 puts of 130 bytes), the time to verify and decode it
  (`decode_task_text`), to check it against the layout (`check_task`) and the shards
  (`in_its_shard`), and to build its transactions' requests (no call is made; with
  `--code-only`, only this: `resync_cost.py` does the same for the watcher's resync);

- **a wakeup**: the CPU time of a thread that only sleeps, per `time.sleep` of 0, 1 ms and
  12 ms (a 12 ms sleep is about what a worker's thread does while one transaction crosses
  the benchmarks' 10 ms link). A thread that sleeps spends no CPU on its own work: what it
  is charged is the kernel's (and, in a virtual machine, the hypervisor's) price of going
  to sleep and waking up.
- **an etcd call**: the CPU of a process that makes `--calls` calls in a row through
  kvmesh's client (`Etcd.get` of one key, and `Etcd.txn` of 127 puts of 130 bytes, a
  worker's usual transaction), per call, with gRPC's EventEngine client (gRPC's default,
  `GRPC_EXPERIMENTS=event_engine_client`) and without it (`-event_engine_client`, what
  kvmesh's client sets since 2026-11-30 unless GRPC_EXPERIMENTS is set),
  straight to a local etcd and through `delay_proxy.py` (`--delay` each way). Each case
  runs in a process of its own (gRPC reads the variable when it loads), in an order that
  turns around every round.

Why it exists: the worker's CPU per write in `scale_workers.py` is several times what its
Python code takes when timed alone (decoding, checks and building the transaction come to
about 3-4 us per write here), and the rounds in which four slots scale worst are those in
which every process spent more CPU per write (performance-log.md). This shows where the rest
goes on a machine where entering the kernel is dear.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchcommon import WakeProbe, check_alive, discard, spawn, stop, wait_for, write_json  # noqa: E402

from pipeline.tools.servers import EtcdServer, free_port  # noqa: E402

SLEEPS = (0.0, 0.001, 0.012)

CALLER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from pipeline.clients.etcd import Etcd, Put
from pipeline.config import ClusterConfig, WRITE
etcd = Etcd(ClusterConfig(name="b", id=2, endpoints=({url!r},)), 10, WRITE)
puts = [Put(b"bench/call/%03d" % i, os.urandom(130), 0) for i in range(127)]
out = {{}}
calls = (("get", lambda: etcd.get(b"bench/call/001")), ("txn", lambda: etcd.txn([], puts)))
for name, call in calls:
    for _ in range(20):
        call()
    cpu, wall = time.process_time(), time.monotonic()
    for _ in range({calls}):
        call()
    out[name] = {{"cpu_us": (time.process_time() - cpu) / {calls} * 1e6,
                 "wall_ms": (time.monotonic() - wall) / {calls} * 1e3}}
etcd.close()
print(json.dumps(out))
"""


def code_cost(n: int) -> dict[str, float]:
    """µs per write of each step of the worker's own code on one task (see the docstring)."""
    import timeit
    import zlib

    # through kvmesh's client, which sets how gRPC loads before anything imports it
    from pipeline.clients.etcd import _fill_ops, etcdrpc
    from pipeline.protocol.layout import Op
    from pipeline.protocol.wire import (
        Batch,
        Operation,
        Signer,
        SigningKeys,
        _unsigned_task,
        decode_task_text,
    )
    from workers.applier import in_its_shard
    from workers.store import _ops
    from workers.tasks import check_task

    shards = 16
    keys: dict[int, list[bytes]] = {s: [] for s in range(shards)}
    i = 0
    while min(len(k) for k in keys.values()) < 127:
        key = b"cilium/cache/identities/v1/c1/id/%d" % (100000 + i)
        keys[zlib.crc32(key) % shards].append(key)
        i += 1
    batches = [
        Batch(
            "c1",
            "c2",
            f"identities-{s}",
            1,
            (1, s),
            (2, s),
            tuple(Operation(Op.PUT, k, os.urandom(130)) for k in keys[s][:127]),
        )
        for s in range(4)
    ]
    writes = sum(len(b.ops) for b in batches)
    signer = Signer(SigningKeys((os.urandom(32),)))
    text = signer.signed_json(_unsigned_task(batches, None)).encode()
    task = decode_task_text(text, signer)

    def build() -> None:
        for b in task.batches:
            request = etcdrpc.TxnRequest()
            _fill_ops(request.success, _ops(b.ops, 0))
            request.SerializeToString()

    steps = {
        "decode": lambda: decode_task_text(text, signer),
        "check": lambda: check_task(task, {"c1"}, {"c2"}),
        "shards": lambda: [in_its_shard(b, shards) for b in task.batches],
        "build": build,
    }
    return {name: timeit.timeit(f, number=n) / n / writes * 1e6 for name, f in steps.items()}


def sleep_cost(seconds: float, n: int) -> float:
    """The CPU (µs) charged to a thread of its own per sleep of *seconds*, over *n* sleeps."""
    probe = WakeProbe(seconds).start()
    while probe.sleeps < n:
        time.sleep(0.05)
    return probe.stop()


def call_cost(url: str, calls: int, event_engine: bool) -> dict[str, Any]:
    env = dict(os.environ)
    # named either way: kvmesh's client turns it off unless the environment says (etcd.py)
    env["GRPC_EXPERIMENTS"] = "event_engine_client" if event_engine else "-event_engine_client"
    code = CALLER.format(root=str(ROOT), url=url, calls=calls)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=600
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def code_only(repeat: int, out: str | None) -> None:
    """The code measurements alone, *repeat* times, and their medians (to *out* too)."""
    rows = []
    for r in range(repeat):
        rows.append(code_cost(100))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()))
    print("medians (us per write):")
    medians = {name: statistics.median(row[name] for row in rows) for name in rows[0]}
    for name, value in medians.items():
        print(f"  {name}: {value:.2f}")
    if out:
        write_json({"rows": rows, "medians": medians}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.005, help="the proxy's delay each way, s")
    ap.add_argument("--json")
    ap.add_argument(
        "--code-only",
        action="store_true",
        help="time the worker's code only (no etcd, no sleeps)",
    )
    args = ap.parse_args()
    if args.code_only:
        code_only(args.repeat, args.json)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-call-cost-"))
    server = EtcdServer(tmp / "etcd")
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    try:
        server.start()
        port = free_port()
        log = tmp / "proxy.log"
        spawn(
            procs,
            [
                sys.executable,
                str(HERE / "delay_proxy.py"),
                str(port),
                str(server.port),
                str(args.delay),
            ],
            log,
        )
        wait_for("the proxy", lambda: b"ready" in log.read_bytes(), 10, log, [*procs, server])
        links = {"local": server.url, "link": f"http://127.0.0.1:{port}"}
        cases = [(link, ee) for link in links for ee in (True, False)]
        for r in range(args.repeat):
            code = code_cost(100)
            rows.append({"round": r + 1, "what": "code", "us_per_write": code})
            print(
                f"round {r + 1}: the worker's code per write: "
                + ", ".join(f"{k} {v:.2f} us" for k, v in code.items())
                + f", {sum(code.values()):.2f} us in all",
                flush=True,
            )
            sleeps = {s: sleep_cost(s, 200 if s else 2000) for s in SLEEPS}
            rows.append({"round": r + 1, "what": "sleep", "cpu_us": sleeps})
            print(
                f"round {r + 1}: a thread's CPU per sleep: "
                + ", ".join(f"{s * 1000:g} ms {us:.0f} us" for s, us in sleeps.items()),
                flush=True,
            )
            for link, ee in cases if r % 2 == 0 else cases[::-1]:
                check_alive([*procs, server], "the calls")
                got = call_cost(links[link], args.calls, ee)
                rows.append({"round": r + 1, "what": "call", "link": link, "ee": ee, **got})
                print(
                    f"round {r + 1}: {link:5s} EventEngine {'on ' if ee else 'off'}: "
                    + ", ".join(
                        f"{name} {v['cpu_us']:.0f} us CPU, {v['wall_ms']:.2f} ms"
                        for name, v in got.items()
                    ),
                    flush=True,
                )
    finally:
        stop(procs)
        discard(server)
        shutil.rmtree(tmp, ignore_errors=True)
    print("medians:")
    code_rows = [row["us_per_write"] for row in rows if row["what"] == "code"]
    for name in code_rows[0]:
        print(f"  {name}: {statistics.median(c[name] for c in code_rows):.2f} us per write")
    for s in SLEEPS:
        cpu = [row["cpu_us"][s] for row in rows if row["what"] == "sleep"]
        print(f"  sleep {s * 1000:g} ms: {statistics.median(cpu):.0f} us of CPU")
    for link, ee in cases:
        got = [
            row for row in rows if row["what"] == "call" and (row["link"], row["ee"]) == (link, ee)
        ]
        for name in ("get", "txn"):
            cpu = statistics.median(row[name]["cpu_us"] for row in got)
            wall = statistics.median(row[name]["wall_ms"] for row in got)
            print(
                f"  {name} {link:5s} EventEngine {'on ' if ee else 'off'}: "
                f"{cpu:.0f} us of CPU per call, {wall:.2f} ms"
            )
    if args.json:
        write_json({"args": vars(args), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
