"""Configuration loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_settings, settings_from_mapping
from pipeline.protocol.errors import ConfigError

MINIMAL = """
[broker]
url = "redis://127.0.0.1:6379/0"

[sync]
shards = 8

[[clusters]]
name = "cluster-a"
id = 1
endpoints = ["http://127.0.0.1:2379"]

[[clusters]]
name = "cluster-b"
id = 2
endpoints = ["http://127.0.0.1:22379"]
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "mesh.toml"
    p.write_text(text)
    return str(p)


def test_minimal_file_is_a_full_mesh(tmp_path: Path) -> None:
    """Every listed cluster is a source and a target; defaults fill the rest."""
    s = load_settings(write(tmp_path, MINIMAL), env={})
    assert [c.name for c in s.sources] == ["cluster-a", "cluster-b"]
    assert [c.name for c in s.targets_of("cluster-a")] == ["cluster-b"]
    assert s.sync.shards == 8 and s.sync.identities == "id"
    assert s.sync.max_batch_ops == 127


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """KVMESH_* variables win over the file, including per-cluster endpoints and secrets."""
    env = {
        "KVMESH_SYNC_SHARDS": "16",
        "KVMESH_BROKER_URL": "redis://:s3cret@10.0.0.1:6379/1",
        "KVMESH_CLUSTER_CLUSTER_B_ENDPOINTS": "http://10.0.0.2:2379,http://10.0.0.3:2379",
    }
    s = load_settings(write(tmp_path, MINIMAL), env=env)
    assert s.sync.shards == 16
    assert s.broker.url.endswith("10.0.0.1:6379/1")
    assert s.cluster("cluster-b").endpoints == ("http://10.0.0.2:2379", "http://10.0.0.3:2379")
    assert "s3cret" not in repr(s)


def test_config_path_from_environment(tmp_path: Path) -> None:
    """KVMESH_CONFIG names the file when --config is not given."""
    s = load_settings(None, env={"KVMESH_CONFIG": write(tmp_path, MINIMAL)})
    assert len(s.clusters) == 2


def test_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    """Credentials come from a file and stay out of repr()."""
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    text = MINIMAL.replace(
        'id = 1\nendpoints = ["http://127.0.0.1:2379"]',
        f'id = 1\nendpoints = ["https://127.0.0.1:2379"]\nusername = "kvmesh"\n'
        f'password_file = "{pw}"\ntls.ca_file = "{ca}"',
    )
    s = load_settings(write(tmp_path, text), env={})
    a = s.cluster("cluster-a")
    assert a.read.password == a.write.password == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in repr(a.read)


def test_read_and_write_credentials_default_to_the_cluster_ones(tmp_path: Path) -> None:
    """[clusters.read] and [clusters.write] override the cluster-wide user or certificate
    per role; what they leave out comes from the cluster-wide settings."""
    files = {}
    for name in ("ca", "cert", "key", "rcert", "rkey", "wpw", "pw"):
        files[name] = tmp_path / name
        files[name].write_text(name)
    text = MINIMAL.replace(
        'id = 1\nendpoints = ["http://127.0.0.1:2379"]',
        f"""id = 1
endpoints = ["https://127.0.0.1:2379"]
username = "both"
password_file = "{files["pw"]}"
tls = {{ ca_file = "{files["ca"]}", cert_file = "{files["cert"]}", key_file = "{files["key"]}" }}
read = {{ cert_file = "{files["rcert"]}", key_file = "{files["rkey"]}" }}
write = {{ username = "writer", password_file = "{files["wpw"]}" }}""",
    )
    a = load_settings(write(tmp_path, text), env={"KVMESH_CLUSTER_CLUSTER_A_READ_PASSWORD": "r"})
    cluster = a.cluster("cluster-a")
    assert (cluster.read.username, cluster.read.password) == ("both", "r")
    assert cluster.read.cert_file == str(files["rcert"])
    assert (cluster.write.username, cluster.write.password) == ("writer", "wpw")
    assert cluster.write.cert_file == str(files["cert"])


def test_signing_keys_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """The signing key file holds one key per line (the first signs); the environment can
    give them instead; short keys are refused."""
    keys = tmp_path / "keys"
    keys.write_text("# current first\n" + "a" * 64 + "\n" + "b" * 40 + "\n")
    text = MINIMAL.replace("[broker]\n", f'[broker]\nsigning_key_file = "{keys}"\n')
    s = load_settings(write(tmp_path, text), env={})
    assert s.signing.keys == (b"a" * 64, b"b" * 40)
    assert "aaaa" not in repr(s)
    s = load_settings(write(tmp_path, MINIMAL), env={"KVMESH_BROKER_SIGNING_KEYS": "c" * 32})
    assert s.signing.keys == (b"c" * 32,)
    with pytest.raises(ConfigError, match="at least 32"):
        load_settings(write(tmp_path, MINIMAL), env={"KVMESH_BROKER_SIGNING_KEYS": "short"})
    unsigned = load_settings(write(tmp_path, MINIMAL), env={})
    with pytest.raises(ConfigError, match="insecure_unsigned"):
        unsigned.require_signing("kvmesh watch")
    insecure = MINIMAL.replace("[broker]\n", "[broker]\ninsecure_unsigned = true\n")
    load_settings(write(tmp_path, insecure), env={}).require_signing("kvmesh watch")


def test_a_password_over_plain_http_is_refused(tmp_path: Path) -> None:
    """etcd tokens are never sent over plain http, so a user there would fail on every
    call: it is a config error, naming the field."""
    pw = tmp_path / "pw"
    pw.write_text("x")
    text = MINIMAL.replace("id = 1\n", f'id = 1\nusername = "u"\npassword_file = "{pw}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env={})
    assert err.value.field == "clusters[cluster-a].username" and "https" in str(err.value)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ('tls = { ca_file = "/nonexistent/ca.pem" }', "clusters[cluster-a].tls.ca_file"),
        (
            'read = { cert_file = "/nonexistent/c.pem", key_file = "/nonexistent/k.pem" }',
            "clusters[cluster-a].read.cert_file",
        ),
    ],
)
def test_missing_tls_files_are_config_errors(tmp_path: Path, table: str, field: str) -> None:
    """TLS files that do not exist are reported at load time with their field."""
    text = MINIMAL.replace("id = 1\n", f"id = 1\n{table}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env={})
    assert err.value.field == field and "cannot read" in str(err.value)


def test_environment_for_an_unknown_cluster_is_an_error(tmp_path: Path) -> None:
    """An override that names no configured cluster is a mistake, not something to ignore."""
    with pytest.raises(ConfigError, match="KVMESH_CLUSTER_CLUSTER_Z_ENDPOINTS"):
        load_settings(
            write(tmp_path, MINIMAL), env={"KVMESH_CLUSTER_CLUSTER_Z_ENDPOINTS": "http://h:1"}
        )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (MINIMAL.replace("shards = 8", "shards = 0"), "sync.shards"),
        (MINIMAL.replace("shards = 8", 'shards = "many"'), "sync.shards"),
        (MINIMAL.replace("shards = 8", 'identities = "some"'), "sync.identities"),
        (MINIMAL.replace("shards = 8", "bogus = 1"), "sync.bogus"),
        (MINIMAL.replace('"cluster-b"', '"Cluster_B"'), "clusters[1].name"),
        (MINIMAL.replace("id = 2", "id = 1"), "clusters[cluster-b].id"),
        (MINIMAL.replace("id = 2", "id = 0"), "clusters[cluster-b].id"),
        (MINIMAL.replace('["http://127.0.0.1:22379"]', "[]"), "clusters[cluster-b].endpoints"),
        (
            MINIMAL.replace("http://127.0.0.1:22379", "127.0.0.1:22379"),
            "clusters[cluster-b].endpoints",
        ),
        (MINIMAL.replace("redis://", "amqp://"), "broker.url"),
        ("[broker]\n", "clusters"),
        # numbers TOML allows that no setting can take: each a one-line error, not a crash
        (MINIMAL.replace("shards = 8", "shards = inf"), "sync.shards"),
        (MINIMAL.replace("shards = 8", "shards = 1.5"), "sync.shards"),
        (MINIMAL.replace("shards = 8", "leader_ttl = nan"), "sync.leader_ttl"),
        (MINIMAL.replace("shards = 8", "etcd_timeout = inf"), "sync.etcd_timeout"),
        (MINIMAL + "[worker]\ngap_wait = -1.0\n", "worker.gap_wait"),
        (
            MINIMAL.replace("[sync]", "visibility_timeout = 0.0\n[sync]"),
            "broker.visibility_timeout",
        ),
        (
            MINIMAL.replace("http://127.0.0.1:22379", "http://[::1:22379"),
            "clusters[cluster-b].endpoints",
        ),
        # numbers too large to use: gRPC takes a deadline of 1e12 s as one already passed,
        # and etcd's requests carry integers in 64 bits
        (MINIMAL.replace("shards = 8", "etcd_timeout = 1e12"), "sync.etcd_timeout"),
        (MINIMAL + "[worker]\nmax_retry_delay = 604801.0\n", "worker.max_retry_delay"),
        (MINIMAL.replace("shards = 8", "page_size = 1e300"), "sync.page_size"),
        (MINIMAL.replace("shards = 8", "page_size = 1000001"), "sync.page_size"),
        (MINIMAL.replace("shards = 8", "max_queue_depth = 1e20"), "sync.max_queue_depth"),
        (MINIMAL.replace("shards = 8", "etcd_timeout = 1" + "0" * 400), "sync.etcd_timeout"),
        (MINIMAL.replace("shards = 8", "page_size = 1" + "0" * 5000), "--config"),
        (MINIMAL.replace("shards = 8", "drain_check_interval = 0.0"), "sync.drain_check_interval"),
        (MINIMAL.replace("shards = 8", "drain_grace = -1.0"), "sync.drain_grace"),
        (MINIMAL.replace("shards = 8", "resync_interval = -1.0"), "sync.resync_interval"),
        (MINIMAL.replace("shards = 8", "max_batch_bytes = 1500001"), "sync.max_batch_bytes"),
        (MINIMAL.replace("shards = 8", "max_held_changes = 0"), "sync.max_held_changes"),
        (MINIMAL.replace("shards = 8", "max_held_bytes = 1000"), "sync.max_held_bytes"),
        (MINIMAL.replace("shards = 8", "max_queue_bytes = 1000"), "sync.max_queue_bytes"),
        (MINIMAL.replace("shards = 8", "idle_flush_max_rate = -1"), "sync.idle_flush_max_rate"),
        (MINIMAL.replace("shards = 8", "idle_flush_max_rate = 49"), "sync.idle_flush_max_rate"),
        # a quiet watch is asked for its progress once a fence poll
        (MINIMAL.replace("shards = 8", "fence_poll_interval = 20.0"), "sync.watch_timeout"),
        (
            MINIMAL.replace("shards = 8", "fence_poll_interval = 3.0\nwatch_timeout = 5.0"),
            "sync.watch_timeout",
        ),
        (MINIMAL + "[worker]\nconcurrency = 0\n", "worker.concurrency"),
        (MINIMAL + "[worker]\nconcurrency = 257\n", "worker.concurrency"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    """Every invalid setting is reported with the field it concerns."""
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env={})
    assert err.value.field == field


def test_a_broker_url_that_cannot_be_parsed_is_refused_without_its_password(
    tmp_path: Path,
) -> None:
    """A password with a "/" that is not percent-encoded makes the URL's port unreadable;
    the error names the field and shows nothing of the URL (the password least of all)."""
    for password in ("s3cr/et", "12/ab", "12#ab", "12?ab", "/x"):
        url = f"redis://:{password}@127.0.0.1:6379/0"
        text = MINIMAL.replace("redis://127.0.0.1:6379/0", url)
        with pytest.raises(ConfigError) as err:
            load_settings(write(tmp_path, text), env={})
        assert err.value.field == "broker.url"
        assert password not in str(err.value) and "127.0.0.1" not in str(err.value)
    for fine in ("redis://:p%2Fw@127.0.0.1:6379/0", "redis://[::1]:6379/0", "redis://h/0"):
        text = MINIMAL.replace("redis://127.0.0.1:6379/0", fine)
        assert load_settings(write(tmp_path, text), env={}).broker.url == fine


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    """A missing file or broken TOML is a config error, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[[clusters]\n"), env={})
    with pytest.raises(ConfigError, match="no config file"):
        load_settings(None, env={})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(MINIMAL.replace("cluster-a", "cluster-\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(str(bad), env={})


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    s = settings_from_mapping(
        {"clusters": [{"name": "a", "id": 1, "endpoints": ["http://h:1"]}]}, {}
    )
    with pytest.raises(AttributeError):
        s.sync.shards = 3  # type: ignore[misc]


def test_whole_numbers_and_durations_at_their_limits(tmp_path: Path) -> None:
    """A whole number is the same from the file and from the environment (8.0 is 8), and
    the largest values are taken."""
    text = MINIMAL.replace(
        "shards = 8", "shards = 8.0\npage_size = 1000000\nresync_interval = 604800"
    )
    s = load_settings(write(tmp_path, text), env={"KVMESH_SYNC_MAX_QUEUE_DEPTH": "70.0"})
    assert (s.sync.shards, s.sync.page_size, s.sync.max_queue_depth) == (8, 1_000_000, 70)
    assert s.sync.resync_interval == 604800
    text = MINIMAL + "[worker]\nconcurrency = 256\n"
    assert load_settings(write(tmp_path, text), env={}).worker.concurrency == 256
    for bad in ("7.5", "many", "inf", "1e20", "1" * 5000, str(-(1 << 63) - 1)):
        with pytest.raises(ConfigError) as err:
            load_settings(write(tmp_path, MINIMAL), env={"KVMESH_SYNC_MAX_QUEUE_DEPTH": bad})
        assert err.value.field == "sync.max_queue_depth"
