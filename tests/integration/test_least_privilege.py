"""Least privilege against real etcd: TLS with real certificates, users taken from the client
certificate's CN (`--client-cert-auth`), RBAC with Cilium's `remote` role on every source,
a write role limited to the cache side on every target, and password users whose tokens
expire. The whole pipeline runs with those users and nothing more."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from etcd3 import etcdrpc

from pipeline.clients.etcd import Put
from pipeline.tools.cilium_state import make_state, write_items
from pipeline.tools.servers import EtcdTLS, find_binary

from ..harness import Mesh, Servers, eventually

pytestmark = pytest.mark.integration


class Pki:
    """A CA, an etcd server certificate and client certificates by common name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self.issue("etcd-server", "127.0.0.1", "localhost")

    def issue(self, cn: str, *hosts: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*(hosts or (f"{cn}.client.invalid",)), common_name=cn)
        cert_file, key_file = self.root / f"{cn}.pem", self.root / f"{cn}-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return str(cert_file), str(key_file)


class TokenProbes:
    """Tokens of *user* on etcd *i*, all taken at once, each looked at no more than once."""

    def __init__(self, mesh: RbacMesh, i: int, user: str, count: int) -> None:
        cert, key = mesh.anonymous
        creds = grpc.ssl_channel_credentials(
            root_certificates=mesh.pki.ca_file.read_bytes(),
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )
        self._channel = grpc.secure_channel(mesh.etcds[i].url.split("//")[-1], creds)
        auth = etcdrpc.AuthStub(self._channel)
        login = etcdrpc.AuthenticateRequest(name=user, password=f"{user}-secret")
        self._tokens = [auth.Authenticate(login, timeout=10).token for _ in range(count)]
        self._kv = etcdrpc.KVStub(self._channel)

    def one_expired(self) -> bool:
        """Whether the newest token not looked at yet is refused."""
        assert self._tokens, "every probe token was looked at and still valid"
        token = self._tokens.pop()
        try:
            self._kv.Range(
                etcdrpc.RangeRequest(key=b"kvmesh/"), timeout=10, metadata=(("token", token),)
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise
        return False

    def close(self) -> None:
        self._channel.close()


class RbacMesh(Mesh):
    """Every etcd serves TLS with client-certificate auth and RBAC on:

    - `remote`: read-only, exactly Cilium's remote role (`cilium/state/`,
      `cilium/cluster-config/<c>`, `cilium/synced/<c>/`, `cilium/.heartbeat`);
    - `kvmesh`: read-write on `cilium/cache/`, `cilium/synced/`, `kvmesh/` and on the cluster
      config key of each other cluster, nothing else;
    - `root`: the administrator, used by the test to seed state.

    With `passwords`, kvmesh logs in as `remote-pw` / `kvmesh-pw` with passwords (the users'
    certificates then only open the TLS connection: etcd takes the token's user)."""

    def __init__(self, servers: Servers, passwords: bool = False, **kw: Any) -> None:
        self.pki = Pki(servers.root)
        self.passwords = passwords
        self.admin = self.pki.issue("root")
        self.remote = self.pki.issue("remote")
        self.kvmesh = self.pki.issue("kvmesh")
        self.anonymous = self.pki.issue("nobody")  # a user with no role
        super().__init__(servers, **kw)

    def etcd_tls(self, i: int) -> EtcdTLS | None:
        return EtcdTLS(str(self.pki.ca_file), *self.pki.server, *self.admin)

    def etcdctl(self, i: int, *args: str) -> None:
        e = self.etcds[i]
        cmd = [
            find_binary("etcdctl"),
            "--endpoints",
            e.url,
            "--cacert",
            str(self.pki.ca_file),
            "--cert",
            self.admin[0],
            "--key",
            self.admin[1],
            *args,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (args, res.stdout, res.stderr)

    def prepare_etcd(self, i: int) -> None:
        me = self.names[i]
        ctl = self.etcdctl
        ctl(i, "user", "add", "root", "--no-password")
        ctl(i, "user", "grant-role", "root", "root")
        ctl(i, "role", "add", "remote")
        for perm in (
            ["--prefix=true", "remote", "read", "cilium/state/"],
            ["remote", "read", f"cilium/cluster-config/{me}"],
            ["--prefix=true", "remote", "read", f"cilium/synced/{me}/"],
            ["--prefix=true", "remote", "read", "cilium/.heartbeat"],
        ):
            ctl(i, "role", "grant-permission", *perm)
        ctl(i, "role", "add", "kvmesh")
        for prefix in ("cilium/cache/", "cilium/synced/", "kvmesh/"):
            ctl(i, "role", "grant-permission", "--prefix=true", "kvmesh", "readwrite", prefix)
        for other in self.names:
            if other != me:
                ctl(
                    i,
                    "role",
                    "grant-permission",
                    "kvmesh",
                    "readwrite",
                    f"cilium/cluster-config/{other}",
                )
        for user, role in (("remote", "remote"), ("kvmesh", "kvmesh"), ("nobody", None)):
            ctl(i, "user", "add", user, "--no-password")
            if role:
                ctl(i, "user", "grant-role", user, role)
        if self.passwords:
            for user, role in (("remote-pw", "remote"), ("kvmesh-pw", "kvmesh")):
                ctl(i, "user", "add", user, f"--new-user-password={user}-secret")
                ctl(i, "user", "grant-role", user, role)
        ctl(i, "auth", "enable")

    def cluster_tables(self) -> list[dict[str, Any]]:
        tables = super().cluster_tables()
        for t in tables:
            t["tls"] = {"ca_file": str(self.pki.ca_file)}
            if self.passwords:
                for role, user in (("read", "remote-pw"), ("write", "kvmesh-pw")):
                    pw = self.root / f"{user}.password"
                    pw.write_text(f"{user}-secret\n")
                    cert, key = self.anonymous
                    t[role] = {
                        "username": user,
                        "password_file": str(pw),
                        "cert_file": cert,
                        "key_file": key,
                    }
            else:
                t["read"] = {"cert_file": self.remote[0], "key_file": self.remote[1]}
                t["write"] = {"cert_file": self.kvmesh[0], "key_file": self.kvmesh[1]}
        return tables


def seed(mesh: Mesh) -> None:
    for i, name in enumerate(mesh.names):
        state = make_state(name, i + 1, identities=60, nodes=4, services=5, endpoints=30, seed=i)
        write_items(mesh.client(i), state)  # as root: the agents' side


def test_the_pipeline_runs_with_cilium_remote_users_and_certificate_cns(servers: Servers) -> None:
    """Watchers read each source as Cilium's read-only `remote` user, workers and the
    watchers' target-side writes use a user limited to the cache side, both taken from their
    certificates' CN; every cache ends exact, and a source key changes after the start.
    The cached keys sit on leases the write user granted (sync.cache_lease_ttl), 1,000 keys
    a lease at most, as KVStoreMesh's do; writes that keep coming to the same keys need no
    more leases, and the next watcher reads each lease's keys and resumes."""
    mesh = RbacMesh(servers, sync={"cache_lease_ttl": 60})
    try:
        seed(mesh)
        mesh.worker()
        w = mesh.watcher()
        mesh.wait_equal()
        a = mesh.client(0)
        a.put(b"cilium/state/nodes/v1/cluster-a/late", b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/late"),
            timeout=60,
            what="a change synced with least privilege",
        )
        assert w.metric("kvmesh_watcher_source_failures_total") == 0
        eventually(
            lambda: mesh.client(1).count(b"cilium/synced/cluster-a/") == 5,
            timeout=60,
            what="every canary written with the write user",
        )
        _, cached = mesh.client(1).scan(b"cilium/cache/")
        per_lease = Counter(kv.lease for kv in cached)
        assert per_lease and 0 not in per_lease, per_lease
        assert max(per_lease.values()) <= 1000
        # 1,200 writes to 100 node keys, each round synced before the next (so that none
        # is folded into a later one), then a marker: one lease holds all of a's cache (a
        # lease every 1,000 writes would leave the first one held by the identities)
        nodes = [b"cilium/state/nodes/v1/cluster-a/n%d" % i for i in range(100)]
        for r in range(12):
            a.txn([], [Put(k, b'{"r":%d}' % r) for k in nodes])
            eventually(
                lambda r=r: all(
                    kv is not None and kv.value == b'{"r":%d}' % r
                    for kv in (mesh.client(1).get(k.replace(b"/state/", b"/cache/")) for k in nodes)
                ),
                timeout=60,
                what=f"round {r} of the node writes synced",
            )
        a.put(b"cilium/state/nodes/v1/cluster-a/marker", b"{}")
        leases_of_a = {"source_cluster": "cluster-a", "target_cluster": "cluster-b"}

        def a_in_b() -> set[int]:
            _, kvs = mesh.client(1).scan(b"cilium/cache/nodes/v1/cluster-a/")
            if not any(kv.key.endswith(b"/marker") for kv in kvs):
                return set()
            _, kvs = mesh.client(1).scan(b"cilium/")
            return {kv.lease for kv in kvs if b"/cluster-a/" in kv.key}

        eventually(lambda: len(a_in_b()) == 1, timeout=60, what="a's cache on one lease")
        eventually(
            lambda: w.gauge("kvmesh_watcher_cache_leases", **leases_of_a) == 1,
            timeout=60,
            what="the watcher counting one lease",
        )
        w.stop()
        w2 = mesh.watcher("watch2")  # reads the records and each lease's keys (real etcd)
        a.put(b"cilium/state/nodes/v1/cluster-a/late2", b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/late2"),
            timeout=60,
            what="the next watcher syncing",
        )
        eventually(
            lambda: w2.gauge("kvmesh_watcher_cache_leases", **leases_of_a) == 1,
            timeout=60,
            what="the next watcher counting one lease",
        )
        assert w2.metric("kvmesh_watcher_resyncs_total") == 0  # resumed from the fences
        assert len(a_in_b()) == 1
    finally:
        mesh.stop()


def test_the_read_user_cannot_write_and_the_write_user_cannot_touch_state(
    servers: Servers,
) -> None:
    """The roles are what they claim: `remote` cannot write anything, `kvmesh` cannot write
    a cluster's own state or its own cluster config. Each refusal is a RefusedError, which
    the worker counts as retry_refused, not as an etcd down."""
    from pipeline.clients.etcd import Etcd
    from pipeline.config import WRITE, load_settings
    from pipeline.protocol.errors import RefusedError

    mesh = RbacMesh(servers, n=2)
    try:
        settings = load_settings(str(mesh.config), env={})
        a = settings.cluster("cluster-a")
        reader, writer = Etcd(a, 5), Etcd(a, 5, WRITE)
        for client, key in (
            (reader, b"cilium/state/nodes/v1/cluster-a/x"),
            (reader, b"kvmesh/cluster-b/gen"),
            (writer, b"cilium/state/nodes/v1/cluster-a/x"),
            (writer, b"cilium/cluster-config/cluster-a"),
        ):
            with pytest.raises(RefusedError, match="PERMISSION_DENIED"):
                client.put(key, b"x")
        writer.put(b"kvmesh/cluster-b/probe", b"x")
        assert reader.header()[0] > 0  # the read role finds the revision without range on all
    finally:
        mesh.stop()


def test_a_watch_the_role_may_not_read_is_refused_as_such(servers: Servers) -> None:
    """etcd cancels a watch on a range the user's role may not read; the client reports it
    as a refusal (WatchDeniedError), which the feed retries at a widening interval instead
    of logging in again in a loop (tests/unit/test_feed.py)."""
    from pipeline.clients.etcd import Etcd
    from pipeline.config import WRITE, load_settings
    from pipeline.protocol.errors import WatchDeniedError

    mesh = RbacMesh(servers, n=2)
    try:
        settings = load_settings(str(mesh.config), env={})
        a = settings.cluster("cluster-a")
        writer = Etcd(a, 5, WRITE)  # the cache side only: no read on cilium/state/
        errors: list[BaseException] = []
        stream = writer.watch(
            b"cilium/state/nodes/v1/", writer.revision() + 1, lambda *_: None, errors.append
        )
        eventually(lambda: errors, timeout=30, what="the watch refused")
        stream.stop()
        assert isinstance(errors[0], WatchDeniedError), errors
        assert "permission denied" in str(errors[0])
    finally:
        mesh.stop()


@pytest.mark.faults  # restarts an etcd and waits out a token: not for the quick loop
def test_password_users_log_in_again_when_their_token_expires(servers: Servers) -> None:
    """etcd tokens expire (here after 2 s without use): kvmesh logs in again and goes on,
    also after the source etcd restarts and forgets every token."""
    mesh = RbacMesh(
        servers,
        passwords=True,
        etcd_args={i: ["--auth-token", "simple", "--auth-token-ttl", "2"] for i in range(2)},
    )
    try:
        seed(mesh)
        mesh.worker()
        mesh.watcher()
        mesh.wait_equal()
        # the condition under test is an expired token: simple tokens die after 2 s unused,
        # and the workers' tokens are unused while nothing changes. A look at a token renews
        # it, so the wait looks at tokens of its own, taken now (after the workers' last
        # use), a fresh one each time: once one is refused, every token last used before
        # it was taken has expired too.
        probes = TokenProbes(mesh, 1, "kvmesh-pw", count=40)  # 10 s of looks
        eventually(probes.one_expired, timeout=30, interval=0.25, what="the tokens expired")
        probes.close()
        mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/after-expiry", b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/after-expiry"),
            timeout=60,
            what="a change synced after the tokens expired",
        )
        mesh.etcds[0].kill()
        mesh.etcds[0].start()
        mesh.client(0).put(b"cilium/state/nodes/v1/cluster-a/after-restart", b"{}")
        eventually(
            lambda: mesh.client(1).get(b"cilium/cache/nodes/v1/cluster-a/after-restart"),
            timeout=60,
            what="a change synced after the source forgot every token",
        )
        mesh.wait_equal()
    finally:
        mesh.stop()
