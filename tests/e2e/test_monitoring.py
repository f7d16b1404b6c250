"""The monitoring kvmesh ships, checked with the real tools: Prometheus's promtool on the
alert rules (with unit tests of the rules) and the compose Prometheus config, the compose
file against the compose-spec schema, and every metric a rule or the Grafana dashboard
names is one kvmesh exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipeline.source.metrics import WatcherMetrics
from workers.metrics import WorkerMetrics

from ..harness import require_binary

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvmesh.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, cwd=PROM, timeout=60
    )


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    res = promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("test", "rules", "alerts.test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def exported() -> set[str]:
    """Every sample name kvmesh's watchers and workers can export."""
    names: set[str] = set()
    for registry in (WatcherMetrics().registry, _worker_registry()):
        for family in registry.collect():
            base = family.name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return names


def _worker_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    return registry


def expressions() -> list[str]:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs


def test_rules_and_dashboard_name_only_metrics_kvmesh_exports() -> None:
    known = exported()
    used = {m for e in expressions() for m in re.findall(r"\bkvmesh_[a-z0-9_]+", e)}
    assert used and used <= known, sorted(used - known)
    # the dashboard shows what the operators asked for
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in ("Queue depth", "lag", "Operations applied", "Resyncs", "Rejected", "watchers"):
        assert any(wanted in t for t in titles), wanted
    assert "Worker pool slots" in titles


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """No Docker engine here: the compose file is checked against the compose-spec JSON
    schema that check-jsonschema carries (no network needed)."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_runs_prometheus_and_grafana_with_the_shipped_files() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    grafana = compose["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    mounts = {v.split(":")[0] for v in grafana["volumes"]}
    assert {"./deploy/grafana/provisioning", "./deploy/grafana/dashboards"} <= mounts
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["kvmesh-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    watchers = jobs["kvmesh-watcher"]["static_configs"][0]["targets"]
    assert watchers == [f"watch-{i}:9464" for i in (1, 2, 3)]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}
