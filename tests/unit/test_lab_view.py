"""The lab's live view fits an 80-column terminal without cutting cluster names."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.tools.lab.view import SourceView, render


def rendered(width: int, names: list[str]) -> list[str]:
    views = [
        SourceView(
            n,
            queue=1234,
            lag_seconds=12.5,
            synced_keys=1_234_567,
            ops_applied=98_765_432,
            rejected=3,
            targets=15,
            targets_synced=15,
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
