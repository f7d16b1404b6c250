"""Settings: one frozen object holding every default, loaded from a TOML file and then
overridden by environment variables. Nothing here reads the environment at import time.

Environment overrides (all optional):
    KVMESH_CONFIG                    path of the TOML file (when --config is not given)
    KVMESH_BROKER_URL                broker URL (may carry a password: never logged)
    KVMESH_BROKER_SIGNING_KEYS       task signing keys, comma-separated (first one signs)
    KVMESH_<SECTION>_<FIELD>         any scalar of [broker], [sync], [worker], [metrics],
                                     e.g. KVMESH_SYNC_SHARDS=16, KVMESH_WORKER_GAP_WAIT=0.5
    KVMESH_CLUSTER_<NAME>_ENDPOINTS  comma-separated endpoints of cluster NAME
                                     (NAME upper-cased, '-' written as '_')
    KVMESH_CLUSTER_<NAME>_PASSWORD   etcd password of cluster NAME (read and write)
    KVMESH_CLUSTER_<NAME>_READ_PASSWORD, KVMESH_CLUSTER_<NAME>_WRITE_PASSWORD
                                     the password of one role only

Secrets (etcd passwords, the broker URL's password, signing keys) come from files or the
environment, and no repr() of a settings object shows them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.protocol.errors import ConfigError
from pipeline.protocol.layout import Layout
from pipeline.protocol.wire import SigningKeys

# Cilium's own rule for cluster names: lowercase DNS label, at most 32 characters.
CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
# The most bytes of keys and values a batch may hold (sync.max_batch_bytes): about etcd's
# default request limit (1.5 MiB), and small enough that a task of 64 such batches, in
# base64 inside JSON, stays under the 128 MiB a worker reads for one task
# (workers.tasks.MAX_PAYLOAD_BYTES; tests/unit/test_wire.py holds the two together).
MAX_BATCH_BYTES = 1_500_000


@dataclass(frozen=True)
class TLSConfig:
    """Client TLS files for one etcd cluster."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


@dataclass(frozen=True)
class Credentials:
    """How kvmesh authenticates to one etcd in one role: a user with a password, a client
    certificate (etcd maps its CN to a user with --client-cert-auth), both, or neither."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None

    def __repr__(self) -> str:  # never show the password, even by accident
        return f"Credentials(username={self.username!r}, cert_file={self.cert_file!r})"


READ, WRITE = "read", "write"  # the two roles kvmesh takes on an etcd


@dataclass(frozen=True)
class ClusterConfig:
    """One Cilium cluster's etcd. `read` is what a watcher uses on it as a source (Cilium's
    read-only `remote` user is enough); `write` is what workers and the watchers' target-side
    writes use on it as a target."""

    name: str
    id: int
    endpoints: tuple[str, ...]
    source: bool = True
    target: bool = True
    tls: TLSConfig = field(default_factory=TLSConfig)
    read: Credentials = field(default_factory=Credentials)
    write: Credentials = field(default_factory=Credentials)

    def credentials(self, role: str) -> Credentials:
        return self.read if role == READ else self.write

    def __repr__(self) -> str:  # never show a password, even by accident
        return f"ClusterConfig(name={self.name!r}, id={self.id}, endpoints={self.endpoints!r})"


@dataclass(frozen=True)
class BrokerTLS:
    """TLS files for a rediss:// broker."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


MIN_SIGNING_KEY = 32  # characters; `openssl rand -hex 32` gives 64


@dataclass(frozen=True)
class BrokerConfig:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Seconds before Redis hands an unacknowledged task to another worker. Tasks take well
    # under a second; this only matters when a whole worker host dies with tasks in hand.
    visibility_timeout: float = 60.0
    signing_key_file: str = ""
    insecure_unsigned: bool = False  # run without task signatures: for experiments only
    tls: BrokerTLS = field(default_factory=BrokerTLS)


@dataclass(frozen=True)
class SyncConfig:
    shards: int = 8
    identities: str = "id"  # "id" (default, the fix) or "all" (pre-fix behaviour, for comparison)
    max_batch_ops: int = MAX_TXN_OPS - 1  # one op is reserved for the fence
    max_batch_bytes: int = 1_000_000  # etcd's default request limit is 1.5 MiB
    batches_per_task: int = 8  # batches carried by one Celery task, each its own transaction
    linger: float = 0.01  # least seconds between two flushes while the workers keep up
    max_linger: float = 0.5  # the linger grows up to this while tasks wait in the queue
    # publish at once, without the linger, while the source's queue is empty (the workers
    # have taken every task): the linger then spaces flushes only while tasks wait
    idle_flush: bool = True
    # ... but only while the source's changes come slower than this many a second (0: at
    # any rate): faster, a linger gathers several in a task for about as much latency,
    # where flushing each as it came would cost the workers a task per change or two
    idle_flush_max_rate: int = 500
    # a flush whose changes fall in a shard whose last task a worker still holds waits for
    # it (up to max_linger after the last flush): the next task of that shard could only
    # wait for it in another worker, at the price of a read or a failed transaction
    flush_after_ack: bool = True
    page_size: int = 2000  # keys per range request (etcd.py's scan also pages by bytes)
    stall_timeout: float = 10.0  # a fence that does not move for this long means lost batches
    fence_poll_interval: float = 0.5
    resync_interval: float = 0.0  # periodic anti-entropy; 0 disables it
    drain_grace: float = 30.0  # seconds between a removed source's config and the rest going
    drain_check_interval: float = 10.0  # how often watchers look for sources to drain
    max_queue_depth: int = 50_000  # above this many queued tasks a watcher stops publishing
    # ... or above this many bytes of them in the broker: a source of large values would
    # otherwise fill Redis, and every source's publishing would stop with it
    max_queue_bytes: int = 256 * 1024 * 1024
    # changes a target may hold while publishing is paused before they are dropped for a
    # resync (docs/architecture.md, "Publishing without loss when the broker is full")
    max_held_changes: int = 500_000
    # ... and the bytes of their keys and values (op_size): a source of large values would
    # otherwise have the watcher hold a copy of its keyspace (the targets share it), and
    # more while the broker fails
    max_held_bytes: int = 256 * 1024 * 1024
    # Cilium's --max-connected-clusters of the whole mesh: 255, or 511 (cluster IDs then take
    # 9 bits of an identity, shifted by 15 instead of 16)
    max_connected_clusters: int = 255
    leader_ttl: float = 10.0  # seconds a dead active watcher holds its lease before a standby
    # Seconds of the etcd lease every cached key sits on (at most 1,000 keys a lease), kept
    # alive by the active watcher, as KVStoreMesh does (it uses 900). 0: no lease (default):
    # the caches then outlive kvmesh, and a restart resumes without rewriting anything.
    cache_lease_ttl: int = 0
    etcd_timeout: float = 10.0
    # ... but a call to a target made on a watcher's loop, which holds up every other pair
    # of its source meanwhile, waits this long at most (never longer than etcd_timeout):
    # a target that drops packets then fails its call sooner, and is read on a poller
    # thread from then on
    loop_etcd_timeout: float = 2.0
    watch_timeout: float = (
        15.0  # a watch that answers no progress request for this long is replaced
    )


# The most pool slots one `kvmesh worker` runs. Each slot of the prefork pool is a process
# with its own etcd and Redis connections; a larger pool on one machine only shares the same
# cores among more processes, and a typo (1000000) would have Celery try to fork that many.
# More slots are more workers, on this machine or others.
MAX_CONCURRENCY = 256


def check_concurrency(where: str, slots: int) -> None:
    """ConfigError (naming *where*) unless one worker may run *slots* pool slots."""
    if not 1 <= slots <= MAX_CONCURRENCY:
        raise ConfigError(
            where, f"must be from 1 to {MAX_CONCURRENCY}, got {slots} (more slots are more workers)"
        )


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = 2
    pool: str = "prefork"
    # Seconds a task waits in place for its predecessor before handing the batch back to the
    # queue. A predecessor that another worker holds lands within milliseconds; a longer wait
    # only blocks a pool slot while the predecessor is lost or stuck.
    gap_wait: float = 0.1
    gap_retry_delay: float = 0.2  # then it is re-queued with this delay
    max_retry_delay: float = 10.0  # backoff cap for an unreachable target
    # Celery task events (received, started, succeeded) for Flower's task views. Each costs
    # the worker's main process a Redis publish: about 40% of its time when tasks are
    # small. Flower's queue lengths and worker list do not need them.
    task_events: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    watcher_port: int = 0  # 0 disables the watcher's Prometheus endpoint
    worker_port: int = 0  # 0 disables the worker's (served by its main process)
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    clusters: tuple[ClusterConfig, ...]
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    signing: SigningKeys = field(default_factory=SigningKeys)

    def require_signing(self, command: str) -> None:
        """Watchers and workers run only with signing keys, or when told not to."""
        if not self.signing and not self.broker.insecure_unsigned:
            raise ConfigError(
                "broker.signing_key_file",
                f"{command} needs task signing keys (generate one with `kvmesh keygen > FILE`),"
                " or set broker.insecure_unsigned = true to run without signatures",
            )

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        raise ConfigError("clusters", f"no cluster named {name!r}")

    @property
    def sources(self) -> tuple[ClusterConfig, ...]:
        return tuple(c for c in self.clusters if c.source)

    @property
    def targets(self) -> tuple[ClusterConfig, ...]:
        return tuple(c for c in self.clusters if c.target)

    def layout_of(self, cluster: ClusterConfig) -> Layout:
        """The rewrite rules for *cluster* as a source."""
        return Layout(
            cluster.name, cluster.id, self.sync.identities, self.sync.max_connected_clusters
        )

    def targets_of(self, source: str) -> tuple[ClusterConfig, ...]:
        """Every target except the source itself: a cluster never caches its own state."""
        return tuple(c for c in self.targets if c.name != source)


# ---------------------------------------------------------------------------------------------
# loading


MAX_SECONDS = 7 * 24 * 3600  # the longest duration a setting may name
MAX_INTEGER = (1 << 63) - 1


def _shown(raw: Any) -> str:
    """A value as an error shows it: its repr, cut short."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _coerce(section: str, name: str, default: Any, raw: Any) -> Any:
    where = f"{section}.{name}"
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "0", "false", "no"):
            return raw.lower() in ("1", "true", "yes")
        raise ConfigError(where, f"expected a boolean, got {raw!r}")
    if isinstance(default, int):
        number = raw
        if isinstance(number, str):  # an environment override: "8" or "8.0", as TOML takes
            if len(number) > 40:
                raise ConfigError(where, f"expected an integer, got {_shown(raw)}")
            try:
                number = int(number)
            except ValueError:
                try:
                    number = float(number)
                except ValueError:
                    raise ConfigError(where, f"expected an integer, got {_shown(raw)}") from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(where, f"expected an integer, got {_shown(raw)}")
        if isinstance(number, float) and not number.is_integer():  # 1.5, inf, nan
            raise ConfigError(where, f"expected an integer, got {_shown(raw)}")
        if not -MAX_INTEGER - 1 <= number <= MAX_INTEGER:  # etcd's requests carry 64 bits
            raise ConfigError(where, f"does not fit in 64 bits: {_shown(raw)}")
        return int(number)
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise ConfigError(where, f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(where, f"must be at most {MAX_SECONDS} seconds (a week)") from None
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {_shown(raw)}") from None
        if not math.isfinite(value):
            raise ConfigError(where, f"expected a finite number, got {_shown(raw)}")
        # every number of this type is seconds: none is negative, and none over a week
        # (gRPC turns a deadline of 1e12 s into one already passed, so each etcd request
        # would fail as timed out)
        if value < 0:
            raise ConfigError(where, "must not be negative")
        if value > MAX_SECONDS:
            raise ConfigError(
                where, f"must be at most {MAX_SECONDS} seconds (a week), got {_shown(raw)}"
            )
        return value
    if isinstance(default, str):
        if not isinstance(raw, str):
            raise ConfigError(where, f"expected a string, got {raw!r}")
        return raw
    raise ConfigError(where, "unsupported setting type")  # pragma: no cover


def _section(
    cls: type[Any],
    section: str,
    data: Mapping[str, Any],
    env: Mapping[str, str],
    extra: tuple[str, ...] = (),
) -> Any:
    """A table of scalars; names in *extra* are allowed in the file and handled by the
    caller."""
    if not isinstance(data, Mapping):
        raise ConfigError(section, "expected a table")
    known = {
        f.name: f
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default)
    }
    for key in data:
        if key not in known and key not in extra:
            raise ConfigError(f"{section}.{key}", "unknown setting")
    values: dict[str, Any] = {}
    for name, f in known.items():
        default = f.default
        raw = data.get(name, default)
        env_name = f"KVMESH_{section.upper()}_{name.upper()}"
        if env_name in env:
            raw = env[env_name]
        values[name] = _coerce(section, name, default, raw)
    return cls(**values)


def _read_secret_file(where: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(where, f"{path} is not UTF-8 text") from None


def _readable_file(where: str, path: Any) -> str:
    """A file that must exist and be readable (TLS material): checked at load time, so a
    typo is a config error, not a traceback on the first connection."""
    if not isinstance(path, str) or not path:
        raise ConfigError(where, f"expected a file path, got {path!r}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    return path


def _tls_files(where: str, data: Any, allowed: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(data, Mapping):
        raise ConfigError(where, "expected a table")
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", "unknown setting")
        out[key] = _readable_file(f"{where}.{key}", value)
    return out


def _signing_keys(broker: BrokerConfig, env: Mapping[str, str]) -> SigningKeys:
    raw: list[str] = []
    if env.get("KVMESH_BROKER_SIGNING_KEYS"):
        raw = env["KVMESH_BROKER_SIGNING_KEYS"].split(",")
        where = "KVMESH_BROKER_SIGNING_KEYS"
    elif broker.signing_key_file:
        raw = _read_secret_file("broker.signing_key_file", broker.signing_key_file).splitlines()
        where = "broker.signing_key_file"
    keys = tuple(k.strip().encode() for k in raw if k.strip() and not k.strip().startswith("#"))
    for i, k in enumerate(keys):
        if len(k) < MIN_SIGNING_KEY:
            raise ConfigError(
                where, f"key {i + 1} has {len(k)} characters; at least {MIN_SIGNING_KEY} needed"
            )
    if raw and not keys:
        raise ConfigError(where, "holds no key")
    return SigningKeys(keys)


def _env_cluster(name: str) -> str:
    return "KVMESH_CLUSTER_" + name.upper().replace("-", "_")


def _credentials(
    where: str,
    data: Mapping[str, Any],
    default: Credentials,
    env_password: str | None,
) -> Credentials:
    for name in data:
        if name not in ("username", "password_file", "cert_file", "key_file"):
            raise ConfigError(f"{where}.{name}", "unknown setting")
    username = data.get("username", default.username)
    if username is not None and (not isinstance(username, str) or not username):
        raise ConfigError(f"{where}.username", f"expected a user name, got {username!r}")
    password = default.password
    if env_password is not None:
        password = env_password
    elif "password_file" in data:
        password = _read_secret_file(f"{where}.password_file", str(data["password_file"]))
    if (username is None) != (password is None):
        raise ConfigError(f"{where}.username", "a user name and a password go together")
    cert: str | None = default.cert_file
    key: str | None = default.key_file
    if "cert_file" in data or "key_file" in data:
        if ("cert_file" in data) != ("key_file" in data):
            raise ConfigError(where, "cert_file and key_file must be given together")
        cert = _readable_file(f"{where}.cert_file", data["cert_file"])
        key = _readable_file(f"{where}.key_file", data["key_file"])
    return Credentials(username, password, cert, key)


def _cluster(index: int, data: Any, env: Mapping[str, str]) -> ClusterConfig:
    where = f"clusters[{index}]"
    if not isinstance(data, Mapping):
        raise ConfigError(where, "expected a table")
    allowed = {
        "name",
        "id",
        "endpoints",
        "source",
        "target",
        "tls",
        "username",
        "password_file",
        "read",
        "write",
    }
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", "unknown setting")
    name = data.get("name")
    if not isinstance(name, str) or not CLUSTER_NAME.match(name):
        raise ConfigError(
            f"{where}.name", f"must be a lowercase DNS label of at most 32 characters, got {name!r}"
        )
    where = f"clusters[{name}]"
    cid = data.get("id")
    if isinstance(cid, bool) or not isinstance(cid, int) or not 1 <= cid <= 511:
        raise ConfigError(f"{where}.id", f"must be an integer from 1 to 511, got {cid!r}")
    endpoints: Any = data.get("endpoints")
    env_ep = env.get(_env_cluster(name) + "_ENDPOINTS")
    if env_ep:
        endpoints = [e.strip() for e in env_ep.split(",") if e.strip()]
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(f"{where}.endpoints", "must be a non-empty list of URLs")
    for ep in endpoints:
        try:
            parts = urlsplit(ep) if isinstance(ep, str) else None
        except ValueError:  # "Invalid IPv6 URL"
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.endpoints", f"{ep!r} is not an http(s)://host:port URL")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{where}.endpoints", f"{ep!r} has an invalid port") from None
    tls = TLSConfig(
        **_tls_files(f"{where}.tls", data.get("tls", {}), ("ca_file", "cert_file", "key_file"))
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{where}.tls", "cert_file and key_file must be given together")
    secure = all(str(e).startswith("https://") for e in endpoints)
    if any(str(e).startswith("https://") for e in endpoints) and not secure:
        raise ConfigError(f"{where}.endpoints", "mixes http:// and https:// endpoints")
    if secure and not tls.enabled:
        raise ConfigError(f"{where}.tls.ca_file", "https endpoints need a CA file")
    env_base = _env_cluster(name)
    both = _credentials(
        where,
        {k: data[k] for k in ("username", "password_file") if k in data},
        Credentials(cert_file=tls.cert_file, key_file=tls.key_file),
        env.get(env_base + "_PASSWORD"),
    )
    roles = {}
    for role in (READ, WRITE):
        sub = data.get(role, {})
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{where}.{role}", "expected a table")
        creds = _credentials(
            f"{where}.{role}", sub, both, env.get(f"{env_base}_{role.upper()}_PASSWORD")
        )
        if creds.username is not None and not secure:
            # etcd hands out a token that gRPC refuses to send over plain http: every call
            # after the login would fail
            raise ConfigError(
                f"{where}.{role}.username" if "username" in sub else f"{where}.username",
                "an etcd user with a password needs https:// endpoints (tokens are not sent "
                "over plain http); use TLS, or client certificates alone",
            )
        if creds.cert_file is not None and not tls.enabled:
            raise ConfigError(f"{where}.tls.ca_file", "client certificates need a CA file")
        roles[role] = creds
    for flag in ("source", "target"):
        if flag in data and not isinstance(data[flag], bool):
            raise ConfigError(f"{where}.{flag}", "expected a boolean")
    return ClusterConfig(
        name=name,
        id=cid,
        endpoints=tuple(str(e) for e in endpoints),
        source=bool(data.get("source", True)),
        target=bool(data.get("target", True)),
        tls=tls,
        read=roles[READ],
        write=roles[WRITE],
    )


def settings_from_mapping(
    data: Mapping[str, Any], env: Mapping[str, str], keys: bool = True
) -> Settings:
    """Build and validate settings from parsed TOML plus environment overrides. With
    keys=False the signing keys are not read (for commands that neither sign nor verify)."""
    for key in data:
        if key not in ("broker", "sync", "worker", "metrics", "clusters"):
            raise ConfigError(key, "unknown section")
    raw_broker = data.get("broker", {})
    if not isinstance(raw_broker, Mapping):
        raise ConfigError("broker", "expected a table")
    broker_data = dict(raw_broker)
    url_file = broker_data.pop("url_file", None)
    if url_file is not None and "KVMESH_BROKER_URL" not in env:
        broker_data["url"] = _read_secret_file("broker.url_file", str(url_file))
    tls_data = broker_data.pop("tls", {})
    broker: BrokerConfig = _section(BrokerConfig, "broker", broker_data, env)
    broker_tls = BrokerTLS(
        **_tls_files("broker.tls", tls_data, ("ca_file", "cert_file", "key_file"))
    )
    if (broker_tls.cert_file is None) != (broker_tls.key_file is None):
        raise ConfigError("broker.tls", "cert_file and key_file must be given together")
    broker = dataclasses.replace(broker, tls=broker_tls)
    try:
        parts = urlsplit(broker.url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        if (
            parts.netloc and not parts.hostname
        ) or "@" in parts.path + parts.query + parts.fragment:
            raise ValueError("no host, or a user and password cut short")
    except ValueError:
        # never the URL itself in the message: it may hold the password (a "/", "?" or "#"
        # in a password that is not percent-encoded is what ends up here)
        raise ConfigError(
            "broker.url",
            "cannot be parsed (its host or port); percent-encode reserved characters "
            "(/ ? # @ :) in the user and password",
        ) from None
    scheme = parts.scheme
    if scheme not in ("redis", "rediss"):
        raise ConfigError("broker.url", "must be a redis:// or rediss:// URL")
    if (broker_tls.ca_file or broker_tls.cert_file) and scheme != "rediss":
        raise ConfigError("broker.tls", "TLS files need a rediss:// URL")
    signing = _signing_keys(broker, env) if keys else SigningKeys()
    sync: SyncConfig = _section(SyncConfig, "sync", data.get("sync", {}), env)
    if not 1 <= sync.shards <= 64:
        raise ConfigError("sync.shards", f"must be from 1 to 64, got {sync.shards}")
    if sync.identities not in ("id", "all"):
        raise ConfigError("sync.identities", f'must be "id" or "all", got {sync.identities!r}')
    if not 1 <= sync.max_batch_ops <= MAX_TXN_OPS - 1:
        raise ConfigError("sync.max_batch_ops", f"must be from 1 to {MAX_TXN_OPS - 1}")
    if not 1 <= sync.batches_per_task <= 64:
        raise ConfigError("sync.batches_per_task", "must be from 1 to 64")
    if not 1024 <= sync.max_batch_bytes <= MAX_BATCH_BYTES:
        raise ConfigError(
            "sync.max_batch_bytes",
            f"must be from 1024 to {MAX_BATCH_BYTES}, got {sync.max_batch_bytes}",
        )
    if not 1 <= sync.page_size <= 1_000_000:
        raise ConfigError("sync.page_size", "must be from 1 to 1000000")
    if sync.leader_ttl < 1:
        raise ConfigError("sync.leader_ttl", "must be at least 1 second")
    # every change counts 10 a second the moment it comes (a window of 0.1 s): a lower limit
    # would stop the idle flush at the first change
    if sync.idle_flush_max_rate and not 50 <= sync.idle_flush_max_rate <= 10_000_000:
        raise ConfigError("sync.idle_flush_max_rate", "must be 0 (no limit) or from 50 to 10000000")
    if sync.max_queue_depth < 1:
        raise ConfigError("sync.max_queue_depth", "must be at least 1")
    if sync.max_queue_bytes < MAX_BATCH_BYTES:
        raise ConfigError("sync.max_queue_bytes", f"must be at least {MAX_BATCH_BYTES}")
    if sync.max_held_changes < 1:
        raise ConfigError("sync.max_held_changes", "must be at least 1")
    if sync.max_held_bytes < MAX_BATCH_BYTES:
        raise ConfigError("sync.max_held_bytes", f"must be at least {MAX_BATCH_BYTES}")
    if sync.cache_lease_ttl and not 60 <= sync.cache_lease_ttl <= 86_400:
        raise ConfigError(
            "sync.cache_lease_ttl", "must be 0 (no lease) or from 60 to 86400 seconds"
        )
    if sync.max_connected_clusters not in (255, 511):
        raise ConfigError("sync.max_connected_clusters", "must be 255 or 511, as in Cilium")
    # durations are never negative (_coerce); these may not be zero either
    for name in (
        "stall_timeout",
        "etcd_timeout",
        "loop_etcd_timeout",
        "watch_timeout",
        "fence_poll_interval",
        "drain_check_interval",
    ):
        if getattr(sync, name) == 0:
            raise ConfigError(f"sync.{name}", "must be positive")
    if sync.watch_timeout < 2 * sync.fence_poll_interval:
        # a quiet watch is asked for its progress once a fence poll: answered at once, it
        # is heard from about once an interval, and must not look silent in between
        raise ConfigError(
            "sync.watch_timeout",
            f"must be at least twice sync.fence_poll_interval ({sync.fence_poll_interval:g}s)",
        )
    worker: WorkerConfig = _section(WorkerConfig, "worker", data.get("worker", {}), env)
    if worker.pool not in ("prefork", "threads", "solo"):
        raise ConfigError("worker.pool", 'must be "prefork", "threads" or "solo"')
    check_concurrency("worker.concurrency", worker.concurrency)
    if broker.visibility_timeout == 0:
        raise ConfigError("broker.visibility_timeout", "must be positive")
    metrics: MetricsConfig = _section(MetricsConfig, "metrics", data.get("metrics", {}), env)
    for name in ("watcher_port", "worker_port"):
        port = getattr(metrics, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics.{name}", f"{port} is not a TCP port")
    raw_clusters = data.get("clusters")
    if not isinstance(raw_clusters, list) or not raw_clusters:
        raise ConfigError("clusters", "at least one [[clusters]] table is required")
    clusters = tuple(_cluster(i, c, env) for i, c in enumerate(raw_clusters))
    seen_names: set[str] = set()
    seen_ids: set[int] = set()
    for c in clusters:
        if c.name in seen_names:
            raise ConfigError(f"clusters[{c.name}].name", "duplicate cluster name")
        if c.id in seen_ids:
            raise ConfigError(f"clusters[{c.name}].id", f"cluster id {c.id} is used twice")
        seen_names.add(c.name)
        seen_ids.add(c.id)
        if c.id > sync.max_connected_clusters:
            raise ConfigError(
                f"clusters[{c.name}].id",
                f"{c.id} is above sync.max_connected_clusters ({sync.max_connected_clusters})",
            )
    known_env = {_env_cluster(c.name) for c in clusters}
    for name in env:
        if name.startswith("KVMESH_CLUSTER_"):
            base = next(
                (
                    k
                    for k in known_env
                    if name.startswith(k + "_")
                    and name[len(k) + 1 :]
                    in ("ENDPOINTS", "PASSWORD", "READ_PASSWORD", "WRITE_PASSWORD")
                ),
                None,
            )
            if base is None:
                raise ConfigError(name, "names no configured cluster, or no known setting")
    return Settings(
        clusters=clusters,
        broker=broker,
        sync=sync,
        worker=worker,
        metrics=metrics,
        signing=signing,
    )


def load_settings(
    path: str | None, env: Mapping[str, str] | None = None, keys: bool = True
) -> Settings:
    """Load the TOML file at *path* (or $KVMESH_CONFIG) and apply environment overrides;
    keys=False leaves the signing keys unread."""
    env = os.environ if env is None else env
    path = path or env.get("KVMESH_CONFIG")
    if not path:
        raise ConfigError("--config", "no config file given (use --config or KVMESH_CONFIG)")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not valid TOML: not UTF-8 text") from None
    except ValueError as exc:  # an integer of more than 4,300 digits, which Python refuses
        raise ConfigError("--config", f"{path} cannot be read: {exc}") from None
    return settings_from_mapping(data, env, keys)
