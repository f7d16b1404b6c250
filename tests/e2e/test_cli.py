"""The kvmesh CLI end to end: real processes against a config file."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.tools.cilium_state import make_state, write_items
from pipeline.tools.servers import free_port

from ..harness import Mesh, Proc, Servers, eventually, kvmesh

pytestmark = pytest.mark.e2e


run = kvmesh  # the CLI as a user runs it


def test_config_errors_name_the_field_and_exit_2(tmp_path: Path) -> None:
    """A broken config is reported with its field, with exit code 2 and no traceback."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[sync]\nshards = -1\n[[clusters]]\nname = "a"\nid = 1\n'
        'endpoints = ["http://127.0.0.1:1"]\n'
    )
    for cmd in ("watch", "worker", "verify", "status"):
        res = run(cmd, "--config", str(cfg))
        assert res.returncode == 2, (cmd, res.stderr)
        assert "sync.shards" in res.stderr and "Traceback" not in res.stderr
    res = run("watch", "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "cannot read" in res.stderr
    # the lab's data directory must be empty: a one-line error, before anything starts
    res = run("lab", "--data-dir", str(tmp_path), "--duration", "0")
    assert res.returncode == 2 and "--data-dir: must be empty" in res.stderr
    assert "Traceback" not in res.stderr
    # as many lab workers as one worker may have slots, said before anything starts
    res = run("lab", "--workers", "300", "--duration", "0")
    assert res.returncode == 2 and "--workers: must be from 1 to 256, got 300" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_mode_validates_without_connecting(mesh: Mesh) -> None:
    """--check validates config and arguments and exits without touching a store."""
    res = mesh.cli("watch", "--check", "--source", "cluster-b")
    assert res.returncode == 0 and "cluster-b" in res.stdout
    res = mesh.cli("worker", "--check", "--concurrency", "3")
    assert res.returncode == 0 and "kvmesh.cluster-a,kvmesh.cluster-b" in res.stdout
    res = mesh.cli("watch", "--check", "--source", "nope")
    assert res.returncode == 2 and "nope" in res.stderr
    for slots in ("0", "257", "1000000"):
        res = mesh.cli("worker", "--check", "--concurrency", slots)
        assert res.returncode == 2, res.stderr
        assert f"--concurrency: must be from 1 to 256, got {slots}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
    res = mesh.cli("worker", "--check", "--concurrency", "256")
    assert res.returncode == 0 and "with 256 slots" in res.stdout, res.stdout
    # the solo pool has one slot: worker.concurrency (2 here) does not apply, silently; a
    # --concurrency asked for does not either, and the worker says so (the warning is the
    # feature)
    res = mesh.cli("worker", "--check", "--pool", "solo")
    assert res.returncode == 0 and "with 1 slot (solo pool)" in res.stdout, res.stdout
    assert "does not apply" not in res.stderr, res.stderr
    res = mesh.cli("worker", "--check", "--pool", "solo", "--concurrency", "4")
    assert res.returncode == 0 and "with 1 slot (solo pool)" in res.stdout, res.stdout
    assert "--concurrency 4 does not apply" in res.stderr, res.stderr
    res = mesh.cli("worker", "--check", "--queues", "kvmesh.cluster-a,kvmesh.nope")
    assert res.returncode == 2 and "kvmesh.nope is no source's queue" in res.stderr, res.stderr


def test_watch_worker_count_and_status(mesh: Mesh) -> None:
    """watch and worker as subprocesses sync a mesh; count and status report it."""
    for i, name in enumerate(mesh.names):
        write_items(
            mesh.client(i),
            make_state(name, i + 1, identities=120, nodes=4, services=6, endpoints=40, seed=i),
        )
    mesh.worker()
    mesh.watcher()
    res = mesh.verify(60)
    assert res.returncode == 0, res.stdout + res.stderr
    res = mesh.cli("count", "--cluster", "cluster-b", "cilium/cache/identities/v1/cluster-a/")
    assert res.returncode == 0 and int(res.stdout) == 120
    res = mesh.cli("count", "--cluster", "cluster-a", "cilium/state/identities/v1/")
    assert int(res.stdout) > 120  # id and value keys in the source

    def settled() -> list[dict[str, object]] | None:
        out = mesh.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        ok = all(r["lag_revisions"] == 0 and r["canaries"] == 5 and r["queue"] == 0 for r in rows)
        return rows if ok else None

    rows = eventually(settled, timeout=90, what="status lag 0 with every canary")
    assert {(r["source"], r["target"]) for r in rows} == {
        ("cluster-a", "cluster-b"),
        ("cluster-b", "cluster-a"),
    }
    for r in rows:
        # the counts `verify` gives: every key the target should hold, none rejected
        assert r["cached_keys"] == r["expected_keys"] == r["source_keys"] + 1  # + config
        assert r["rejected_keys"] == 0
        assert r["workers"]["applied"] > 0
        assert r["waiting_for_source_canary"] == []
    table = mesh.cli("status")
    assert table.returncode == 0 and "cluster-a" in table.stdout and "lag" in table.stdout
    fast = json.loads(mesh.cli("status", "--json", "--fast").stdout)
    assert all(r["expected_keys"] is None and r["cached_keys"] > 0 for r in fast)
    # a broker that does not answer: exit 3, one line naming it, never its password
    port = free_port()
    dead = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "--config", str(mesh.config)],
        capture_output=True,
        text=True,
        env=dict(mesh.env, KVMESH_BROKER_URL=f"redis://:hunter2@127.0.0.1:{port}/0"),
        timeout=120,
    )
    assert dead.returncode == 3, dead.stdout + dead.stderr
    assert f"cannot reach the broker at redis://127.0.0.1:{port}/0" in dead.stderr
    assert "hunter2" not in dead.stdout + dead.stderr
    # a source whose identities are not all written yet (its canary is missing) says so
    mesh.client(0).delete(b"cilium/synced/cluster-a/cilium/state/identities/v1")
    table = mesh.cli("status")
    assert "waiting for source canary: identities" in table.stdout, table.stdout
    mesh.client(0).put(
        b"cilium/synced/cluster-a/cilium/state/identities/v1", b"2026-11-28T00:00:00Z"
    )
    # what Cilium's KVStoreMesh would have written, apart from timestamps and leases
    same = mesh.cli("verify", "--against-kvstoremesh-layout")
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.count("KVStoreMesh layout EQUAL") == 2
    mesh.client(1).put(b"cilium/synced/cluster-a/cilium/cache/nodes/v1", b"yesterday")
    off = mesh.cli("verify", "--against-kvstoremesh-layout")
    assert off.returncode == 1
    assert (
        "canary not an RFC 3339 time: cilium/synced/cluster-a/cilium/cache/nodes/v1" in off.stdout
    )


def test_celery_cli_runs_the_worker_app(mesh: Mesh) -> None:
    """`celery -A workers.app worker` with $KVMESH_CONFIG consumes and applies batches."""
    write_items(mesh.client(0), make_state("cluster-a", 1, identities=40, endpoints=10))
    celery = Path(sys.executable).parent / "celery"
    worker = Proc(
        [
            "-A",
            "workers.app",
            "worker",
            "-Q",
            "kvmesh.cluster-a,kvmesh.cluster-b",
            "-c",
            "1",
            "-P",
            "solo",
            "-n",
            "c1@%h",
        ],
        mesh.root / "celery.log",
        mesh.env,
        command=[str(celery)],
    )
    mesh.procs.append(worker)
    mesh.watcher()
    res = mesh.verify(60)
    assert res.returncode == 0, res.stdout + worker.output()


def test_identities_all_mode_copies_value_keys(servers: Servers) -> None:
    """identities = "all" caches value keys too (the pre-fix behaviour, for comparison)."""
    mesh = Mesh(servers, identities="all")
    try:
        state = make_state("cluster-a", 1, identities=100, nodes=6, endpoints=10)
        write_items(mesh.client(0), state)
        mesh.worker()
        mesh.watcher()
        res = mesh.verify(60)
        assert res.returncode == 0, res.stdout
        values = sum(1 for k in state if k.startswith(b"cilium/state/identities/v1/value/"))
        b = mesh.client(1)
        assert b.count(b"cilium/cache/identities/v1/cluster-a/value/") == values
        assert b.count(b"cilium/cache/identities/v1/cluster-a/id/") == 100
        # KVStoreMesh copies identities by ID only: the value keys make the layouts differ
        res = mesh.cli("verify", "--against-kvstoremesh-layout", "--examples", "1")
        assert res.returncode == 1
        assert (
            f"extra {values}," in res.stdout
            and "extra: cilium/cache/identities/v1/cluster-a/value/" in res.stdout
        )
    finally:
        mesh.stop()


def test_credential_and_port_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    """A password user over plain http, TLS files that do not exist, a watcher with no
    signing key, and a metrics port already taken: each is one line naming the field, exit
    2, no traceback, and `--check` reports the first three without connecting."""
    key = tmp_path / "signing.key"
    key.write_text(run("keygen").stdout)
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    base = (
        f'[broker]\nsigning_key_file = "{key}"\n'
        '[[clusters]]\nname = "a"\nid = 1\nendpoints = ["http://127.0.0.1:1"]\n{extra}\n'
        '[[clusters]]\nname = "b"\nid = 2\nendpoints = ["http://127.0.0.1:2"]\n'
    )
    cases = {
        f'username = "u"\npassword_file = "{pw}"': "clusters[a].username",
        'tls.ca_file = "/nonexistent/ca.pem"': "clusters[a].tls.ca_file",
    }
    for extra, field in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(base.replace("{extra}", extra))
        for cmd in ("watch", "worker"):
            res = run(cmd, "--config", str(cfg), "--check")
            assert res.returncode == 2, (cmd, res.stdout, res.stderr)
            assert field in res.stderr and len(res.stderr.strip().splitlines()) == 1
    cfg = tmp_path / "nokey.toml"
    cfg.write_text(base.replace("{extra}", "").replace(f'signing_key_file = "{key}"\n', ""))
    res = run("watch", "--config", str(cfg), "--check")
    assert res.returncode == 2 and "broker.signing_key_file" in res.stderr, res.stderr
    assert "kvmesh keygen" in res.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "port.toml"
        cfg.write_text(base.replace("{extra}", "") + f"[metrics]\nwatcher_port = {port}\n")
        for check in ((), ("--check",)):
            res = run("watch", "--config", str(cfg), *check)
            assert res.returncode == 2 and "metrics.watcher_port" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        cfg.write_text(base.replace("{extra}", "") + f"[metrics]\nworker_port = {port}\n")
        res = run("worker", "--config", str(cfg), "--check")
        assert res.returncode == 2 and "metrics.worker_port" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_watch_says_when_it_cannot_reach_the_broker_and_keeps_trying(mesh: Mesh) -> None:
    """A wrong or down broker is not a quiet standby: the watcher logs one line naming the
    broker (not its password) and is not ready, and it keeps running to try again."""
    port = free_port()
    watcher = mesh.watcher(
        "watch-no-broker", env={"KVMESH_BROKER_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    )
    line = f"cluster-a: cannot reach Redis at 127.0.0.1:{port}"
    assert watcher.metrics_port
    url = f"http://127.0.0.1:{watcher.metrics_port}/readyz"

    def not_ready() -> str | None:
        try:
            urllib.request.urlopen(url, timeout=3)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            # 503 "starting" comes first, before the watcher's first try; each source's
            # reason on its own (another source may not have tried yet)
            return body if exc.code == 503 and line in body else None
        except OSError:
            return None
        raise AssertionError("ready without a broker")

    # the state first: not ready, with the reason
    reason = eventually(not_ready, what="not ready without a broker")
    assert line in reason, reason
    # and the line an operator reads, which is the feature here (written in the same pass)
    eventually(lambda: line in watcher.output(), timeout=10, what="the unreachable-broker line")
    assert watcher.alive()
    assert "hunter2" not in watcher.output()
