"""The CPU an etcd watch costs the process that holds it, per watch response.

    python benchmarks/watch_cost.py [--txns 2000] [--puts 4] [--repeat 3] [--json FILE]

A writer in another process commits --txns transactions of --puts puts each under
`kvmesh/a/fence/` into a fresh etcd; each transaction is one revision, and a watch that
keeps up gets one response for each. This process either holds kvmesh's watch on `kvmesh/`
(`Etcd.watch`, the call the watcher makes on each source) and counts the responses, or
holds nothing (the baseline): the difference in its CPU time, divided by the responses, is
what one response costs. Rounds alternate the two, and the script prints each round and
the median.

Why it exists: a watch in every pool process, on the fences of each target, was tried on
2026-11-30 (performance-log.md), and it cost more CPU than the waits it saved. This gives the
number behind that, and what the watcher pays per source event at a low rate (when each
change is a response of its own).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchcommon import discard  # noqa: E402

from pipeline.clients.etcd import Etcd, Event  # noqa: E402
from pipeline.config import WRITE  # noqa: E402
from pipeline.tools.servers import EtcdServer  # noqa: E402

WRITER = """
import sys
sys.path.insert(0, {root!r})
from pipeline.clients.etcd import Etcd, Put
from pipeline.config import ClusterConfig, WRITE
etcd = Etcd(ClusterConfig(name="b", id=2, endpoints=({url!r},)), 10, WRITE)
for i in range({txns}):
    etcd.txn([], [Put(b"kvmesh/a/fence/nodes-%d" % j, b'{{"gen":1,"pos":[%d,%d]}}' % (i, j))
                  for j in range({puts})])
"""


def one(server: EtcdServer, txns: int, puts: int, watch: bool) -> dict[str, float]:
    cluster = server.cluster("b", 2)
    etcd = Etcd(cluster, 10, WRITE)
    responses = [0]
    lock = threading.Lock()

    def on_events(events: list[Event], revision: int) -> None:
        with lock:
            responses[0] += 1

    def on_error(exc: BaseException) -> None:
        print(f"watch failed: {exc}", file=sys.stderr)

    stream = etcd.watch(b"kvmesh/", etcd.revision() + 1, on_events, on_error) if watch else None
    time.sleep(0.5)  # the watch created
    cpu0, wall0 = time.process_time(), time.monotonic()
    code = WRITER.format(root=str(ROOT), url=server.url, txns=txns, puts=puts)
    subprocess.run([sys.executable, "-c", code], check=True)
    if stream is not None:
        deadline = time.monotonic() + 30
        while responses[0] < txns and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(0.05)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    if stream is not None:
        stream.stop()
    etcd.close()
    return {"watch": float(watch), "responses": responses[0], "cpu_s": cpu, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--txns", type=int, default=2000)
    ap.add_argument("--puts", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-watch-cost-"))
    rounds: list[dict[str, object]] = []
    costs: list[float] = []
    try:
        for r in range(args.repeat):
            got = {}
            for watch in (True, False) if r % 2 == 0 else (False, True):
                server = EtcdServer(tmp / f"etcd-{r}-{int(watch)}")
                server.start()
                try:
                    got[watch] = one(server, args.txns, args.puts, watch)
                finally:
                    discard(server)
            with_w, without = got[True], got[False]
            per = (with_w["cpu_s"] - without["cpu_s"]) / max(1, with_w["responses"])
            rounds.append(
                {"with_watch": with_w, "without": without, "cpu_us_per_response": per * 1e6}
            )
            costs.append(per * 1e6)
            print(
                f"round {r + 1}: {with_w['responses']:.0f} responses; this process's CPU "
                f"{with_w['cpu_s'] * 1000:.0f} ms with the watch, {without['cpu_s'] * 1000:.0f} ms "
                f"without: {per * 1e6:.0f} us per response",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median(costs)
    print(f"median: {med:.0f} us of CPU per watch response")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
