"""The broker as a real deployment runs it: a Redis ACL user with a password in the broker
URL, and rediss:// with a CA and a client certificate. The whole pipeline syncs through
each, and the URL's password never shows in a log."""

from __future__ import annotations

from typing import Any

import pytest
import trustme

from pipeline.tools.cilium_state import make_state, write_items
from pipeline.tools.servers import RedisServer, RedisTLS

from ..harness import Mesh, Servers, eventually, require_tls_redis

pytestmark = pytest.mark.integration


class AclMesh(Mesh):
    def make_redis(self, servers: Servers) -> RedisServer:
        return servers.redis(start=False, user="kvmesh", password="acl-" + "p" * 20)


class TlsMesh(Mesh):
    def make_redis(self, servers: Servers) -> RedisServer:
        ca = trustme.CA()
        root = servers.root
        files = {
            name: str(root / f"redis-{name}.pem") for name in ("ca", "cert", "key", "ccert", "ckey")
        }
        ca.cert_pem.write_to_path(files["ca"])
        server = ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(files["cert"])
        server.private_key_pem.write_to_path(files["key"])
        client = ca.issue_cert("kvmesh.client.invalid")
        client.cert_chain_pems[0].write_to_path(files["ccert"])
        client.private_key_pem.write_to_path(files["ckey"])
        self.tls_files = files
        return servers.redis(
            start=False,
            password="tls-" + "p" * 20,
            binary=require_tls_redis(root),
            tls=RedisTLS(files["ca"], files["cert"], files["key"], files["ccert"], files["ckey"]),
        )

    def broker_tables(self) -> dict[str, Any]:
        f = self.tls_files
        return {"tls": {"ca_file": f["ca"], "cert_file": f["ccert"], "key_file": f["ckey"]}}


@pytest.mark.parametrize("kind", [AclMesh, TlsMesh], ids=["acl-user", "rediss"])
def test_the_pipeline_syncs_through_an_authenticated_broker(
    servers: Servers, kind: type[Mesh]
) -> None:
    """Watchers, workers, status and the tests' own reads all reach the broker with its
    user, password and TLS files; no log line carries the password."""
    mesh = kind(servers)
    try:
        for i, name in enumerate(mesh.names):
            write_items(
                mesh.client(i), make_state(name, i + 1, identities=40, endpoints=20, seed=i)
            )
        worker = mesh.worker()
        watcher = mesh.watcher()
        mesh.wait_equal()
        # the workers' outcomes reach the broker's hash within a quarter second
        eventually(
            lambda: mesh.stats("cluster-a", "cluster-b").get("applied", 0) > 0,
            timeout=30,
            what="the workers' outcomes in the broker",
        )
        status = mesh.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        password = mesh.redis.password
        assert password and password not in worker.output() + watcher.output()
    finally:
        mesh.stop()
