"""deploy/kubernetes/ checked without a cluster: both kustomizations render with kubectl,
every Kubernetes object validates against the API schema of its kind (kubernetes-validate,
strict: unknown fields fail), the KEDA objects against KEDA's v1alpha1 schema (committed in
tests/schemas/), and the operators' expectations hold: non-root pods, probes, disruption
budgets, network policies, a scaler for every source queue, a config every kvmesh command
accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.tools.servers import free_port

from ..harness import kvmesh, require_binary

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = {
    "base": ROOT / "deploy" / "kubernetes" / "base",
    "clustermesh": ROOT / "deploy" / "kubernetes" / "overlays" / "clustermesh",
    "solo-workers": ROOT / "deploy" / "kubernetes" / "overlays" / "solo-workers",
}
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are meant for
KEDA = json.loads((ROOT / "tests" / "schemas" / "keda-v1alpha1.json").read_text())


def render(name: str) -> list[dict[str, Any]]:
    res = subprocess.run(
        [require_binary("kubectl"), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def kinds(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_every_object_validates(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    validator = jsonschema.Draft202012Validator
    seen = set()
    for obj in objs:
        kind = obj["kind"]
        seen.add(kind)
        if obj["apiVersion"].startswith("keda.sh/"):
            schema = {**KEDA, "$ref": f"#/$defs/{kind}"}
            validator(schema).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} <= seen
    assert {"NetworkPolicy", "ScaledObject", "TriggerAuthentication", "ConfigMap"} <= seen


def test_the_keda_schema_refuses_what_keda_would() -> None:
    """The committed schema is no rubber stamp: a misspelt field and a missing target fail."""
    objs = render("base")
    scaled = kinds(objs, "ScaledObject")["kvmesh-worker"]
    schema = {**KEDA, "$ref": "#/$defs/ScaledObject"}
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(scaled))
    del broken["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in ("Deployment", "StatefulSet"):
        for name, obj in kinds(objs, kind).items():
            out[name] = obj["spec"]["template"]["spec"]
    return out


def test_pods_run_without_privilege(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    for name, spec in pods(objs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "memory" in c["resources"]["limits"], name
            assert "livenessProbe" in c and "readinessProbe" in c, name


def test_watchers_and_workers_probe_health_and_readiness_and_are_scraped(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    deployments = kinds(objs, "Deployment")
    assert deployments["kvmesh-watcher"]["spec"]["replicas"] == 2  # active and standby
    services = kinds(objs, "Service")
    budgets = kinds(objs, "PodDisruptionBudget")
    for name, port in (("watcher", 9464), ("worker", 9465)):
        container = deployments[f"kvmesh-{name}"]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
        service = services[f"kvmesh-{name}-metrics"]
        assert service["spec"]["ports"][0]["name"] == "metrics"  # for a ServiceMonitor
        assert f"kvmesh-{name}" in budgets
    assert budgets["kvmesh-watcher"]["spec"]["minAvailable"] == 1


_UNITS = {"gb": 1 << 30, "mb": 1 << 20, "Gi": 1 << 30, "Mi": 1 << 20}


def _bytes(size: str) -> int:
    number = size.rstrip("bgimkBGIMK")
    return int(number) * _UNITS[size[len(number) :]]


def test_redis_refuses_writes_before_its_container_runs_out_of_memory(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """Redis's own limit lies well under the container's: at it Redis refuses writes (the
    watchers pause, `broker_error`) instead of being killed and killed again as it reloads
    its append-only file. Half the limit leaves room for the fork of an AOF rewrite."""
    _, objs = rendered
    (redis,) = pods(objs)["kvmesh-redis"]["containers"]
    command = " ".join(redis["args"])
    policy = re.search(r"--maxmemory-policy (\S+)", command)
    assert policy is not None and policy.group(1) == "noeviction", command
    limit = re.search(r"--maxmemory (\S+)", command)
    assert limit is not None, command
    assert 0 < _bytes(limit.group(1)) <= _bytes(redis["resources"]["limits"]["memory"]) // 2


def test_every_pod_has_a_network_policy(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    selected = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for p in kinds(objs, "NetworkPolicy").values()
    }
    for kind in ("Deployment", "StatefulSet"):
        for name, obj in kinds(objs, kind).items():
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] in selected, name


def mesh_toml(objs: list[dict[str, Any]], name: str = "kvmesh-config") -> str:
    """The mesh.toml of a generated ConfigMap (its name carries a hash suffix)."""
    (config,) = (c for n, c in kinds(objs, "ConfigMap").items() if n.rsplit("-", 1)[0] == name)
    text = config["data"]["mesh.toml"]
    assert isinstance(text, str)
    return text


def mounted(spec: dict[str, Any], container: dict[str, Any]) -> tuple[set[str], set[str], str]:
    """What a container can read: (files, directories whose every file it can read, and the
    name of the ConfigMap mounted at /etc/kvmesh)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: set[str] = set()
    dirs: set[str] = set()
    config = ""
    for m in container["volumeMounts"]:
        v, at = volumes[m["name"]], m["mountPath"].rstrip("/")
        if "configMap" in v:
            config = v["configMap"]["name"].rsplit("-", 1)[0]
        elif "secret" in v and v["secret"].get("items"):
            files |= {f"{at}/{i['path']}" for i in v["secret"]["items"]}
        elif "secret" in v or "projected" in v:
            dirs.add(at)
    return files, dirs, config


def test_keda_scales_the_workers_on_every_source_queue(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objs = rendered
    (scaled,) = kinds(objs, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "kvmesh-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1
    clusters = tomllib.loads(mesh_toml(objs))["clusters"]
    queues = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]}
    assert queues == {f"kvmesh.{c['name']}" for c in clusters}
    namespace = "kube-system" if name == "clustermesh" else "kvmesh"
    for t in scaled["spec"]["triggers"]:
        assert t["metadata"]["address"] == f"kvmesh-redis.{namespace}.svc:6379"
        assert t["authenticationRef"]["name"] in kinds(objs, "TriggerAuthentication")
    if name == "clustermesh":  # kube-system is Cilium's: it is neither created nor relabelled
        assert not kinds(objs, "Namespace")


def test_the_solo_overlay_keeps_the_slot_budget() -> None:
    """solo-workers: one slot per worker replica where the base has worker.concurrency, so
    as many more replicas at most, and as many fewer waiting tasks per replica before KEDA
    adds one: the same slots, scaled at the same depth per slot."""
    base, solo = render("base"), render("solo-workers")
    slots = tomllib.loads(mesh_toml(base))["worker"]["concurrency"]
    assert slots > 1
    (worker,) = kinds(solo, "Deployment")["kvmesh-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["args"][-2:] == ["--pool", "solo"]
    b = kinds(base, "ScaledObject")["kvmesh-worker"]["spec"]
    s = kinds(solo, "ScaledObject")["kvmesh-worker"]["spec"]
    assert s["maxReplicaCount"] == b["maxReplicaCount"] * slots
    for tb, ts in zip(b["triggers"], s["triggers"], strict=True):
        assert int(ts["metadata"]["listLength"]) * slots == int(tb["metadata"]["listLength"])


def secrets_used(objs: list[dict[str, Any]]) -> set[str]:
    names = set()
    for spec in pods(objs).values():
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
            for src in v.get("projected", {}).get("sources", []):
                names.add(src["secret"]["name"])
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
    for t in kinds(objs, "TriggerAuthentication").values():
        names |= {r["name"] for r in t["spec"]["secretTargetRef"]}
    return names


def test_every_secret_is_documented(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """No secret is committed; docs/production.md says how to make each one used."""
    _, objs = rendered
    assert not kinds(objs, "Secret")
    doc = (ROOT / "docs" / "production.md").read_text()
    for name in secrets_used(objs):
        assert f"`{name}`" in doc, name


def test_every_kvmesh_command_accepts_the_config_map(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each container's command passes `--check` against the config it mounts, with only the
    files its volumes give it made in a temporary directory: a container that names a file
    it does not mount (Flower and an etcd certificate, say) fails here."""
    _, objs = rendered
    checked = 0
    for name, obj in kinds(objs, "Deployment").items():
        spec = obj["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["command"] == ["kvmesh"], name
        files, dirs, config_name = mounted(spec, container)
        text = mesh_toml(objs, config_name)
        root = tmp_path / name
        for path in sorted(set(re.findall(r'"(/var/[^"]+)"', text))):
            local = root / path.lstrip("/")
            if path in files or path.rsplit("/", 1)[0] in dirs:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text("k" * 64 + "\n" if path.endswith("signing.key") else "x\n")
                if path.endswith("/url"):
                    local.write_text("redis://:pw@kvmesh-redis:6379/0\n")
            text = text.replace(f'"{path}"', f'"{local}"')
        config = root / "mesh.toml"
        config.write_text(text)
        args = [str(config) if a == "/etc/kvmesh/mesh.toml" else a for a in container["args"]]
        env = dict(
            os.environ,
            FLOWER_BASIC_AUTH="admin:" + "x" * 24,
            KVMESH_METRICS_WORKER_PORT=str(free_port()),
        )
        res = kvmesh(*args, "--check", env=env)
        assert res.returncode == 0, (name, res.stderr)
        checked += 1
    assert checked == 3
