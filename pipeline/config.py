"""Settings: one frozen object holding every default, loaded from a TOML file and then
overridden by environment variables. Nothing here reads the environment at import time.

Environment overrides (all optional):
    KVMESH_CONFIG                    path of the TOML file (when --config is not given)
    KVMESH_BROKER_URL                broker URL (may carry a password: never logged)
    KVMESH_<SECTION>_<FIELD>         any scalar of [broker], [sync], [worker], [metrics],
                                     e.g. KVMESH_SYNC_SHARDS=16, KVMESH_WORKER_GAP_WAIT=0.5
    KVMESH_CLUSTER_<NAME>_ENDPOINTS  comma-separated endpoints of cluster NAME
                                     (NAME upper-cased, '-' written as '_')
    KVMESH_CLUSTER_<NAME>_PASSWORD   etcd password of cluster NAME
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

# Cilium's own rule for cluster names: lowercase DNS label, at most 32 characters.
_CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


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
class ClusterConfig:
    """One Cilium cluster's etcd."""

    name: str
    id: int
    endpoints: tuple[str, ...]
    source: bool = True
    target: bool = True
    tls: TLSConfig = field(default_factory=TLSConfig)
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # from password_file or env only

    def __repr__(self) -> str:  # never show the password, even by accident
        return f"ClusterConfig(name={self.name!r}, id={self.id}, endpoints={self.endpoints!r})"


@dataclass(frozen=True)
class BrokerConfig:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Seconds before Redis hands an unacknowledged task to another worker. Tasks take well
    # under a second; this only matters when a whole worker host dies with tasks in hand.
    visibility_timeout: float = 60.0


@dataclass(frozen=True)
class SyncConfig:
    shards: int = 8
    identities: str = "id"  # "id" (default, the fix) or "all" (pre-fix behaviour, for comparison)
    max_batch_ops: int = MAX_TXN_OPS - 1  # one op is reserved for the fence
    max_batch_bytes: int = 1_000_000  # etcd's default request limit is 1.5 MiB
    batches_per_task: int = 8  # batches carried by one Celery task, each its own transaction
    linger: float = 0.02  # seconds the watcher waits for more events before cutting a batch
    page_size: int = 2000  # keys per range request; keeps responses under gRPC's 4 MiB
    stall_timeout: float = 10.0  # a fence that does not move for this long means lost batches
    fence_poll_interval: float = 1.0
    resync_interval: float = 0.0  # periodic anti-entropy; 0 disables it
    drain_grace: float = 30.0  # seconds between a removed source's config and the rest going
    drain_check_interval: float = 10.0  # how often watchers look for sources to drain
    leader_ttl: float = 10.0  # seconds a dead active watcher holds its lease before a standby
    etcd_timeout: float = 10.0
    watch_timeout: float = (
        15.0  # a watch that answers no progress request for this long is replaced
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


@dataclass(frozen=True)
class MetricsConfig:
    watcher_port: int = 0  # 0 disables the watcher's Prometheus endpoint
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    clusters: tuple[ClusterConfig, ...]
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

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

    def targets_of(self, source: str) -> tuple[ClusterConfig, ...]:
        """Every target except the source itself: a cluster never caches its own state."""
        return tuple(c for c in self.targets if c.name != source)


def queue_name(source: str) -> str:
    """The Celery queue of one source cluster. STABLE API: operators alert on it."""
    return f"kvmesh.{source}"


# ---------------------------------------------------------------------------------------------
# loading


def _coerce(section: str, name: str, default: Any, raw: Any) -> Any:
    where = f"{section}.{name}"
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "0", "false", "no"):
            return raw.lower() in ("1", "true", "yes")
        raise ConfigError(where, f"expected a boolean, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, bool):
            raise ConfigError(where, f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected an integer, got {raw!r}") from None
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise ConfigError(where, f"expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {raw!r}") from None
    if isinstance(default, str):
        if not isinstance(raw, str):
            raise ConfigError(where, f"expected a string, got {raw!r}")
        return raw
    raise ConfigError(where, "unsupported setting type")  # pragma: no cover


def _section(cls: type[Any], section: str, data: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(section, "expected a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known and not (section == "broker" and key == "url_file"):
            raise ConfigError(f"{section}.{key}", "unknown setting")
    values: dict[str, Any] = {}
    for name, f in known.items():
        default = f.default if f.default is not dataclasses.MISSING else None
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


def _env_cluster(name: str) -> str:
    return "KVMESH_CLUSTER_" + name.upper().replace("-", "_")


def _cluster(index: int, data: Any, env: Mapping[str, str]) -> ClusterConfig:
    where = f"clusters[{index}]"
    if not isinstance(data, Mapping):
        raise ConfigError(where, "expected a table")
    allowed = {"name", "id", "endpoints", "source", "target", "tls", "username", "password_file"}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", "unknown setting")
    name = data.get("name")
    if not isinstance(name, str) or not _CLUSTER_NAME.match(name):
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
        parts = urlsplit(ep) if isinstance(ep, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.endpoints", f"{ep!r} is not an http(s)://host:port URL")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{where}.endpoints", f"{ep!r} has an invalid port") from None
    tls_data = data.get("tls", {})
    if not isinstance(tls_data, Mapping):
        raise ConfigError(f"{where}.tls", "expected a table")
    for key in tls_data:
        if key not in ("ca_file", "cert_file", "key_file"):
            raise ConfigError(f"{where}.tls.{key}", "unknown setting")
    tls = TLSConfig(**{k: str(v) for k, v in tls_data.items()})
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{where}.tls", "cert_file and key_file must be given together")
    if any(str(e).startswith("https://") for e in endpoints) and not tls.enabled:
        raise ConfigError(f"{where}.tls.ca_file", "https endpoints need a CA file")
    username = data.get("username")
    password = env.get(_env_cluster(name) + "_PASSWORD")
    if password is None and "password_file" in data:
        password = _read_secret_file(f"{where}.password_file", str(data["password_file"]))
    if (username is None) != (password is None):
        raise ConfigError(f"{where}.username", "username and a password must be given together")
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
        username=None if username is None else str(username),
        password=password,
    )


def settings_from_mapping(data: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Build and validate settings from parsed TOML plus environment overrides."""
    for key in data:
        if key not in ("broker", "sync", "worker", "metrics", "clusters"):
            raise ConfigError(key, "unknown section")
    broker_data = dict(data.get("broker", {}))
    url_file = broker_data.pop("url_file", None)
    if url_file is not None and "KVMESH_BROKER_URL" not in env:
        broker_data["url"] = _read_secret_file("broker.url_file", str(url_file))
    broker: BrokerConfig = _section(BrokerConfig, "broker", broker_data, env)
    if urlsplit(broker.url).scheme not in ("redis", "rediss"):
        raise ConfigError("broker.url", "must be a redis:// or rediss:// URL")
    sync: SyncConfig = _section(SyncConfig, "sync", data.get("sync", {}), env)
    if not 1 <= sync.shards <= 64:
        raise ConfigError("sync.shards", f"must be from 1 to 64, got {sync.shards}")
    if sync.identities not in ("id", "all"):
        raise ConfigError("sync.identities", f'must be "id" or "all", got {sync.identities!r}')
    if not 1 <= sync.max_batch_ops <= MAX_TXN_OPS - 1:
        raise ConfigError("sync.max_batch_ops", f"must be from 1 to {MAX_TXN_OPS - 1}")
    if not 1 <= sync.batches_per_task <= 64:
        raise ConfigError("sync.batches_per_task", "must be from 1 to 64")
    if sync.max_batch_bytes < 1024:
        raise ConfigError("sync.max_batch_bytes", "must be at least 1024")
    if sync.page_size < 1:
        raise ConfigError("sync.page_size", "must be positive")
    if sync.leader_ttl < 1:
        raise ConfigError("sync.leader_ttl", "must be at least 1 second")
    if sync.stall_timeout <= 0:
        raise ConfigError("sync.stall_timeout", "must be positive")
    worker: WorkerConfig = _section(WorkerConfig, "worker", data.get("worker", {}), env)
    if worker.pool not in ("prefork", "threads", "solo"):
        raise ConfigError("worker.pool", 'must be "prefork", "threads" or "solo"')
    if worker.concurrency < 1:
        raise ConfigError("worker.concurrency", "must be at least 1")
    metrics: MetricsConfig = _section(MetricsConfig, "metrics", data.get("metrics", {}), env)
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
    return Settings(clusters=clusters, broker=broker, sync=sync, worker=worker, metrics=metrics)


def load_settings(path: str | None, env: Mapping[str, str] | None = None) -> Settings:
    """Load the TOML file at *path* (or $KVMESH_CONFIG) and apply environment overrides."""
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
    return settings_from_mapping(data, env)
