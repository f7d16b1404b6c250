"""The command line documents itself: every subcommand and flag has help, and the global
flags work before or after the subcommand."""

from __future__ import annotations

import argparse

import pytest

from pipeline.tools.cli import _parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    p = _parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_and_flag_has_help() -> None:
    subs = _subcommands()
    assert set(subs) >= {"watch", "worker", "verify", "status", "lab", "simulate", "count"}
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, sp in subs.items()
        for a in sp._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert missing == []
    assert all(sp.description for sp in subs.values())


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "status"],
        ["status", "--log-level", "DEBUG"],
    ],
)
def test_global_flags_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert _parser().parse_args(argv).log_level == "DEBUG"


def test_the_log_level_defaults_to_info() -> None:
    assert _parser().parse_args(["status"]).log_level == "INFO"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("kvmesh ")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://kvmesh:pw@redis.example:6380/2", "rediss://redis.example:6380/2"),
        ("sentinel://:pw@h1;sentinel://:pw@h2", "sentinel://h1 (and others)"),
        ("redis://:12/secret@h:6379/0", "(the configured broker URL)"),
        ("not a url", "(the configured broker URL)"),
    ],
)
def test_a_broker_is_named_without_its_credentials(url: str, shown: str) -> None:
    from pipeline.tools.cli import broker_address

    assert broker_address(url) == shown


def test_the_metrics_port_binds_ipv6_too() -> None:
    import urllib.request

    from pipeline.source.metrics import WatcherMetrics
    from pipeline.tools.servers import free_port

    port = free_port()
    server = WatcherMetrics().serve(port, "::1", lambda: None)
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=3) as r:
            assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()
