"""The lab's live view fits an 80-column terminal without cutting cluster names."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.tools.lab.view import SourceView, render


def rendered(width: int, names: list[str], big: bool = False) -> list[str]:
    views = [
        SourceView(
            n,
            queue=123_456 if big else 1234,
            lag_seconds=1234.5 if big else 12.5,
            synced_keys=9_999_999 if big else 1_234_567,
            ops_applied=98_765_432_100 if big else 98_765_432,
            rejected=99_950 if big else 3,
            targets=100 if big else 15,
            targets_synced=99 if big else 15,
        )
        for n in names
    ]
    views[0].waiting = ("nodes", "services")
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(render(views, "kvmesh lab: flower http://127.0.0.1:5555 (admin / pw)", width))
    return console.export_text().splitlines()


def test_80_columns_keep_every_cluster_name_whole() -> None:
    names = [f"cluster-{i}" for i in range(1, 17)] + ["production-eu-west-1"]
    lines = rendered(80, names)
    assert max(len(ln) for ln in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text
    for name in names:
        assert any(ln.split()[:1] == [name] for ln in lines), name


def test_a_wide_terminal_gets_every_column() -> None:
    lines = rendered(160, ["cluster-1", "cluster-2"])
    header = next(ln for ln in lines if "source" in ln)
    for col in ("peak", "lag rev", "events", "targets synced"):
        assert col in header


def test_80_columns_keep_the_longest_cilium_names_and_large_counts_whole() -> None:
    """Cilium allows cluster names of 32 characters; counts run into millions."""
    names = ["c" * 32, "production-eu-west-1", "cluster-1"]
    lines = rendered(80, names, big=True)
    assert max(len(ln) for ln in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text, text
    assert "c" * 32 in text and "123k" in text and "99/100" in text and "syncing" in text


def test_counts_take_at_most_five_characters() -> None:
    from pipeline.tools.lab.view import _short

    for v in (0, 9_999, 10_000, 99_949, 99_950, 999_499, 999_500, 9_999_999, 10**8, 10**11):
        assert len(_short(v)) <= 5, (v, _short(v))
    assert _short(1234) == "1234" and _short(12_345) == "12.3k" and _short(2_500_000) == "2.50M"
