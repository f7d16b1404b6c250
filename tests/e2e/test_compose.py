"""docker-compose.yml checked without a Docker engine: every kvmesh command it runs is a
valid CLI invocation against the config it mounts, and that config names its services."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.tools.servers import free_port

from ..harness import kvmesh

ROOT = Path(__file__).resolve().parents[2]
MOUNT = "/etc/kvmesh/mesh.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def mounted_config(service: dict[str, Any]) -> Path:
    for vol in service.get("volumes", []):
        host, _, rest = vol.partition(":")
        if rest.split(":")[0] == MOUNT:
            return ROOT / host
    raise AssertionError(f"{MOUNT} is not mounted")


def test_services_of_a_three_cluster_mesh(compose: dict[str, Any]) -> None:
    """Three etcds, a simulator and a watcher per cluster, Redis, a worker pool, Flower,
    Prometheus and Grafana."""
    services = set(compose["services"])
    expected = {"redis", "worker", "flower", "prometheus", "grafana"} | {
        f"{k}-{i}" for k in ("etcd", "sim", "watch") for i in (1, 2, 3)
    }
    assert services == expected


def test_upstream_images_are_pinned_and_stores_have_healthchecks(compose: dict[str, Any]) -> None:
    """No floating tags; etcd, Redis, watchers, workers and Flower are health-checked."""
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        tag = image.rpartition(":")[2]
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), (name, image)
        assert "healthcheck" in svc or name.startswith("sim-"), name
    redis = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    # the password reaches Redis through a config file, never its command line
    assert "requirepass" in redis and "--requirepass" not in redis
    assert "$$(cat /run/secrets/redis_password)" in redis


def test_redis_has_a_memory_limit_and_evicts_nothing(compose: dict[str, Any]) -> None:
    """Redis refuses writes at its limit (the watchers pause) rather than growing until the
    machine kills it, and never evicts a queued task or its payload."""
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--maxmemory [1-9][0-9]*[mg]b\b", command), command


def test_worker_scales_and_flower_uses_an_env_file(compose: dict[str, Any]) -> None:
    """The worker has no fixed name or host port; Flower's credentials come from a secret
    file that scripts/compose-secrets makes (git ignores it), through `kvmesh flower`."""
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    flower = compose["services"]["flower"]
    assert flower["env_file"] == ["deploy/secrets/flower.env"]
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert flower["command"][:2] == ["kvmesh", "flower"]


def test_secrets_come_from_files_never_from_the_compose_file(compose: dict[str, Any]) -> None:
    """The broker URL (Redis's password) and the signing key are compose secrets; every kvmesh
    service gets them; nothing in the compose file or the mounted config holds a secret."""
    assert set(compose["secrets"]) == {
        "broker_url",
        "signing_key",
        "redis_password",
        "grafana_password",
    }
    for name, spec in compose["secrets"].items():
        assert spec["file"].startswith("./deploy/secrets/"), name
    config = tomllib.loads(mounted_config(compose["services"]["worker"]).read_text())
    assert config["broker"] == {
        "url_file": "/run/secrets/broker_url",
        "signing_key_file": "/run/secrets/signing_key",
    }
    for name, svc in compose["services"].items():
        if name == "flower":
            assert svc["secrets"] == ["broker_url"], "Flower holds no signing key"
        elif svc.get("image", "").startswith("kvmesh"):
            assert {"broker_url", "signing_key"} <= set(svc["secrets"]), name


def test_flower_refuses_the_example_password(compose: dict[str, Any], tmp_path: Path) -> None:
    """Started with the committed example credentials, Flower does not start: exit 2, one
    line naming FLOWER_BASIC_AUTH. With generated ones it would."""
    config = secret_config(compose, tmp_path)
    flower = compose["services"]["flower"]["command"]
    args = [str(config) if a == MOUNT else a for a in flower[1:]]
    example = (ROOT / "deploy" / "flower.env.example").read_text()
    auth = next(ln for ln in example.splitlines() if ln.startswith("FLOWER_BASIC_AUTH="))
    env = dict(os.environ, FLOWER_BASIC_AUTH=auth.partition("=")[2])
    res = kvmesh(*args, "--check", env=env)
    assert res.returncode == 2 and "FLOWER_BASIC_AUTH" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    env["FLOWER_BASIC_AUTH"] = "admin:" + "x" * 24
    res = kvmesh(*args, "--check", env=env)
    assert res.returncode == 0, res.stderr


def secret_config(compose: dict[str, Any], tmp_path: Path) -> Path:
    """The mounted config with its /run/secrets/ paths pointing at generated files, as
    scripts/compose-secrets would make them."""
    text = mounted_config(compose["services"]["worker"]).read_text()
    files = {
        "broker_url": "redis://:pw@redis:6379/0",
        "signing_key": "k" * 64,
    }
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
        text = text.replace(f"/run/secrets/{name}", str(tmp_path / name))
    config = tmp_path / "mesh.toml"
    config.write_text(text)
    return config


def test_every_kvmesh_command_is_valid_against_the_mounted_config(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Each kvmesh service's command passes `--check` with the file it would mount."""
    config = secret_config(compose, tmp_path)
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "kvmesh":
            continue
        args = [str(config) if a == MOUNT else a for a in cmd[1:]]
        # a free port for the worker's metrics: the check binds it
        env = dict(
            os.environ,
            FLOWER_BASIC_AUTH="admin:" + "x" * 24,
            KVMESH_METRICS_WORKER_PORT=str(free_port()),
        )
        res = kvmesh(*args, "--check", env=env)
        assert res.returncode == 0, (name, res.stdout, res.stderr)
        assert res.stdout.startswith("ok"), (name, res.stdout)
        checked += 1
    assert checked == 8  # three simulators, three watchers, the worker, Flower
    # `celery -A workers.app` loads the app from $KVMESH_CONFIG
    env = dict(os.environ, KVMESH_CONFIG=str(config))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import workers.app as a; print(sorted(q.name for q in a.app.conf.task_queues))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "kvmesh.cluster-3" in res.stdout


def test_mounted_config_names_the_services(compose: dict[str, Any]) -> None:
    """Every endpoint and the broker in the mounted config are compose service names."""
    config = mounted_config(compose["services"]["worker"])
    data = tomllib.loads(config.read_text())
    services = set(compose["services"])
    script = (ROOT / "scripts" / "compose-secrets").read_text()
    assert "@redis:6379/0" in script  # the broker URL it writes names the redis service
    for cluster in data["clusters"]:
        for ep in cluster["endpoints"]:
            assert urlsplit(ep).hostname in services
    sims = {compose["services"][f"sim-{i}"]["command"][-3] for i in (1, 2, 3)}
    watched = {compose["services"][f"watch-{i}"]["command"][-1] for i in (1, 2, 3)}
    assert sims == watched == {c["name"] for c in data["clusters"]}


def test_docker_compose_config_when_available() -> None:
    """`docker compose config` accepts the file (skipped where no compose binary exists)."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0
    ):
        pytest.skip("no docker compose binary on this machine")
    res = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
