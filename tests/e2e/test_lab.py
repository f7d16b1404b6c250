"""`kvmesh lab` end to end: a whole mesh, Flower polled while it runs, the final report, and
no process left behind."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.tools.orphan import wrap
from pipeline.tools.servers import free_port

from ..harness import eventually, require_binary

pytestmark = pytest.mark.e2e


def leftovers(root: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", root], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return out.split()


def start_lab(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path, str]:
    """Start `kvmesh lab` with its data under tmp_path/lab; returns the process, its
    console log and the data directory."""
    require_binary("etcd")
    require_binary("redis-server")
    log = tmp_path / "lab.log"
    root = tmp_path / "lab"
    # -X faulthandler: a lab that does not end in time is sent SIGABRT (see ended), and
    # Python then writes every thread's stack into the log
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pipeline", "lab", "--data-dir", str(root)]
    proc = subprocess.Popen(
        wrap([*cmd, *args]),
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, log, str(root)


def ended(proc: subprocess.Popen[str], log: Path, timeout: float) -> int:
    """The lab's exit code, once it has ended. One still running after *timeout* seconds is
    aborted and the test fails with the end of its log: every thread's stack, and what the
    lab said before."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise AssertionError(
            f"the lab still ran after {timeout} s:\n{log.read_text(errors='replace')[-8000:]}"
        ) from None


def answers(url: str) -> bool:
    """Whether anything serves HTTP at *url* (an error status counts: it answered)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.mark.timeout(600)  # its own waits add up to 300 s or more: ended() must
# get to abort the lab and keep its stacks before pytest-timeout ends the test
def test_lab_runs_a_mesh_reports_and_cleans_up(tmp_path: Path) -> None:
    """The lab converges, Flower lists every source queue while it runs, the report shows
    identities cached by ID only, and every child is gone afterwards."""
    port = free_port()
    proc, log, root = start_lab(
        tmp_path,
        "--clusters",
        "2",
        "--identities",
        "150",
        "--churn",
        "10",
        "--duration",
        "12",
        "--workers",
        "1",
        "--flower-port",
        str(port),
        "--flower-auth",
        "lab:pw",
    )
    auth = "Basic " + base64.b64encode(b"lab:pw").decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/queues/length", headers={"Authorization": auth}
    )

    def queues() -> set[str] | None:
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return {q["name"] for q in json.loads(r.read())["active_queues"]}
        except OSError:
            return None

    assert eventually(queues, timeout=60, what="flower") == {"kvmesh.cluster-1", "kvmesh.cluster-2"}
    assert ended(proc, log, 240) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "lab: converged" in out
    assert "cluster-1 -> cluster-2: EQUAL" in out and "cluster-2 -> cluster-1: EQUAL" in out
    rows = re.findall(r"^(cluster-\d)\s+(cluster-\d)\s+(\d+)\s+(\d+)\s*$", out, re.M)
    assert len(rows) == 2
    for _target, _source, ids, values in rows:
        assert int(ids) > 100 and int(values) == 0
    src = re.findall(r"^(cluster-\d)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.M)
    assert len(src) == 2 and all(int(v) > 0 for *_, v in src)  # sources do hold value keys
    eventually(lambda: leftovers(root) == [], timeout=60, what="no process left")


def test_a_dead_child_is_reported_and_everything_stops(tmp_path: Path) -> None:
    """When a child dies the lab names it, shows its log tail, exits non-zero and leaves
    no process behind."""
    flower = free_port()
    proc, log, root = start_lab(
        tmp_path,
        "--clusters",
        "2",
        "--identities",
        "50",
        "--churn",
        "5",
        "--duration",
        "120",
        "--workers",
        "1",
        "--flower-port",
        str(flower),
    )
    # the lab starts Flower after the worker and every watcher: once it answers, every
    # child has been started
    eventually(lambda: answers(f"http://127.0.0.1:{flower}/"), timeout=60, what="lab started")
    # the watcher may still be passing from its launcher to itself (an exec): wait for it
    pids = eventually(
        lambda: pgrep(f"pipeline watch --source cluster-1 --config {root}"),
        timeout=30,
        what="the watcher of cluster-1 running",
    )
    subprocess.run(["kill", "-9", *pids], check=True)
    assert ended(proc, log, 120) == 1
    out = log.read_text()
    assert "watch-cluster-1 exited with code -9" in out
    eventually(lambda: leftovers(root) == [], timeout=60, what="no process left")


def query(base: str, promql: str) -> list[dict[str, object]] | None:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            body = json.loads(r.read())
    except OSError:
        return None
    result = body.get("data", {}).get("result")
    return result if isinstance(result, list) else None


@pytest.mark.timeout(600)  # its own waits add up to 300 s or more: ended() must
# get to abort the lab and keep its stacks before pytest-timeout ends the test
def test_lab_prometheus_scrapes_every_watcher_and_the_worker(tmp_path: Path) -> None:
    """`lab --prometheus` starts a real Prometheus: it finds every watcher and the worker up,
    reads their metrics (the worker's summed over its pool processes) and loads kvmesh's
    alert rules."""
    require_binary("prometheus")
    port = free_port()
    proc, log, root = start_lab(
        tmp_path,
        "--clusters",
        "2",
        "--identities",
        "50",
        "--churn",
        "5",
        "--duration",
        "300",
        "--workers",
        "2",
        "--prometheus",
        "--prometheus-port",
        str(port),
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        eventually(ready, timeout=90, what="the lab's Prometheus ready")

        def targets_up() -> bool:
            up = query(base, "up")
            return up is not None and len(up) == 3 and all(r["value"][1] == "1" for r in up)  # type: ignore[index]

        eventually(targets_up, timeout=60, what="two watchers and the worker scraped")

        def number(promql: str) -> float:
            result = query(base, promql)
            return float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]

        eventually(lambda: number("sum(kvmesh_watcher_active)") == 2, what="both sources active")
        eventually(
            lambda: (
                number("sum(kvmesh_worker_ops_applied_total)") > 0
                and number("sum(kvmesh_sync_lag_seconds_count)") > 0
            ),
            timeout=60,
            what="worker outcomes and lag in Prometheus",
        )
        assert number("sum(kvmesh_worker_concurrency)") == 2
        # both canaries may land after the scrape the wait above saw
        eventually(
            lambda: number("count(kvmesh_remote_cluster_readiness_status == 1)") == 2,
            timeout=60,
            what="both remote clusters ready in Prometheus",
        )
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=3) as r:
            groups = json.loads(r.read())["data"]["groups"]
        assert [g["name"] for g in groups] == ["kvmesh"]
    finally:
        proc.send_signal(2)  # Ctrl-C: the lab stops the churn, reports and cleans up
        ended(proc, log, 180)
    eventually(lambda: leftovers(root) == [], timeout=60, what="no process left")
