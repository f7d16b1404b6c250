"""The body of scripts/demo, run inside the project's venv."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cilium_state import make_state, write_items
from pipeline.etcd import Etcd
from pipeline.servers import EtcdServer, RedisServer

NAMES = ("cluster-a", "cluster-b")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=1100)
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvmesh-demo-"))
    servers: list[EtcdServer | RedisServer] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis = RedisServer(root / "redis")
        etcds = [EtcdServer(root / name) for name in NAMES]
        for s in (redis, *etcds):
            s.start()
            servers.append(s)
        cfg = root / "mesh.toml"
        text = f'[broker]\nurl = "{redis.url}"\n\n'
        for i, (name, e) in enumerate(zip(NAMES, etcds, strict=True)):
            text += f'[[clusters]]\nname = "{name}"\nid = {i + 1}\nendpoints = ["{e.url}"]\n\n'
        cfg.write_text(text)
        print(f"config: {cfg}\n{text}")
        clients = [
            Etcd(e.cluster(n, i + 1)) for i, (n, e) in enumerate(zip(NAMES, etcds, strict=True))
        ]
        for i, (name, c) in enumerate(zip(NAMES, clients, strict=True)):
            write_items(
                c,
                make_state(
                    name,
                    i + 1,
                    identities=args.identities,
                    nodes=20,
                    services=40,
                    endpoints=1000,
                    seed=i,
                ),
            )
        kvmesh = [sys.executable, "-m", "pipeline"]
        env = dict(os.environ)
        for cmd, log in (
            (["worker", "--concurrency", "2"], "worker.log"),
            (["watch"], "watch.log"),
        ):
            with open(root / log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [*kvmesh, *cmd, "--config", str(cfg)],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        t0 = time.monotonic()
        rc = subprocess.run(
            [*kvmesh, "verify", "--config", str(cfg), "--wait", "60"], check=False, env=env
        ).returncode
        print(f"\ninitial sync verified in {time.monotonic() - t0:.1f}s (exit {rc})\n")
        subprocess.run([*kvmesh, "status", "--config", str(cfg)], check=False, env=env)
        print(f"\n{'cluster':<10} {'state/identities/v1':>20} {'.../id':>8} {'.../value':>10}")
        for name, c in zip(NAMES, clients, strict=True):
            base = b"cilium/state/identities/v1/"
            print(
                f"{name:<10} {c.count(base):>20} {c.count(base + b'id/'):>8} "
                f"{c.count(base + b'value/'):>10}"
            )
        print(f"\n{'target':<10} {'from':<10} {'cached .../id':>14} {'cached .../value':>17}")
        for i, (name, c) in enumerate(zip(NAMES, clients, strict=True)):
            src = NAMES[1 - i]
            base = f"cilium/cache/identities/v1/{src}/".encode()
            print(
                f"{name:<10} {src:<10} {c.count(base + b'id/'):>14} {c.count(base + b'value/'):>17}"
            )
        return rc
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        for s in servers:
            s.stop()
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
