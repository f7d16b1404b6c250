"""Flower, as the lab and docker compose run it, shows the depth of every source queue."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from pipeline.tools.servers import free_port

from ..harness import Mesh, eventually

pytestmark = pytest.mark.integration


def get(url: str, auth: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def test_flower_lists_every_source_queue_behind_basic_auth(mesh: Mesh) -> None:
    """GET /api/queues/length needs the credentials and lists kvmesh.<source> for every
    source, with its depth, before any worker consumes."""
    port = free_port()
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    log = open(mesh.root / "flower.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            celery,
            "-A",
            "pipeline.tools.flowerapp",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
        env=dict(mesh.env, FLOWER_BASIC_AUTH="ops:s3cret"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/queues/length"
        _, body = eventually(
            lambda: (r := get(url, "ops:s3cret"))[0] == 200 and r,
            timeout=30,
            what="flower answering",
        )
        names = {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}
        assert names == {"kvmesh.cluster-a": 0, "kvmesh.cluster-b": 0}
        assert get(url, None)[0] == 401
        assert get(url, "ops:wrong")[0] == 401
        # a published batch shows up as depth
        from pipeline.clients.publisher import RedisPublisher
        from pipeline.protocol.layout import Op
        from pipeline.protocol.wire import Batch, Operation

        pub = RedisPublisher("kvmesh.cluster-a", mesh.redis_client(), None)
        pub.publish(
            [
                Batch(
                    "cluster-a",
                    "cluster-b",
                    "nodes-0",
                    1,
                    (1, 0),
                    (2, 0),
                    (Operation(Op.PUT, b"k", b"v"),),
                )
            ]
        )

        def depth() -> int:
            data = json.loads(get(url, "ops:s3cret")[1] or b"{}")
            return {q["name"]: q["messages"] for q in data.get("active_queues", [])}.get(
                "kvmesh.cluster-a", 0
            )

        assert eventually(depth, timeout=60, what="queue depth 1") == 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)  # Flower exits on SIGTERM (pipeline.tools.flowerstop)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left running past the test
            proc.wait(10)
            raise
        finally:
            log.close()
