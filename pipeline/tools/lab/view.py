"""The lab's live view: one row per source cluster, built from the typed pair status of
every (source, target) pair and from the source's watcher metrics."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from dataclasses import dataclass

from rich import box
from rich.table import Table

from pipeline.protocol.layout import RESOURCES
from pipeline.tools.report import PairStatus

CANARIES = sum(1 for r in RESOURCES if r.canary)


@dataclass
class SourceView:
    """One row of the live view."""

    source: str
    queue: int | None = None
    peak_queue: int = 0
    lag_revisions: int | None = None
    lag_seconds: float | None = None
    synced_keys: int = 0
    ops_applied: int = 0
    rejected: int = 0
    events: int = 0
    targets_synced: int = 0
    synced_time: float | None = None  # monotonic: when every target had its initial sync
    targets: int = 0
    waiting: tuple[str, ...] = ()  # resources waiting for their source canary
    peak_lag_seconds: float | None = None  # once every target had its initial sync
    tasks: int = 0  # tasks its watcher published
    task_bytes: int = 0  # of their payloads
    broker_bytes: int = 0  # written to Redis for them: messages, and payloads by reference
    # (events, tasks, payload bytes, broker bytes) when every target first had its initial
    # sync, and the latest while the churn ran: the steady state's cost per source change
    # is their difference
    synced_at: tuple[int, int, int, int] | None = None
    churn_end: tuple[int, int, int, int] | None = None

    @property
    def state(self) -> str:
        if self.waiting:
            return f"waiting for source canary ({', '.join(self.waiting)})"
        return "syncing" if self.targets_synced < self.targets else "in sync"

    def update(self, pairs: list[PairStatus], metrics: dict[str, float]) -> None:
        """Fold the status of this source's pairs and its watcher's metrics into the row."""
        if pairs:
            self.queue = pairs[0].queue
            self.peak_queue = max(self.peak_queue, self.queue or 0)
            lags = [p.lag_revisions for p in pairs]
            self.lag_revisions = None if None in lags else max(lag or 0 for lag in lags)
            seconds = [
                0.0 if p.lag_revisions == 0 else (p.progress_age_s or 0.0)
                for p in pairs
                if p.lag_revisions is not None
            ]
            self.lag_seconds = max(seconds) if seconds else None
            self.synced_keys = sum(p.cached_keys for p in pairs)
            self.ops_applied = sum(p.workers.get("ops_applied", 0) for p in pairs)
            self.targets = len(pairs)
            self.targets_synced = sum(1 for p in pairs if p.canaries == CANARIES)
            self.waiting = tuple(pairs[0].waiting_for_source_canary)
            if self.targets_synced == self.targets and self.lag_seconds is not None:
                self.peak_lag_seconds = max(self.peak_lag_seconds or 0.0, self.lag_seconds)

        def total(name: str) -> int:
            return int(sum(v for k, v in metrics.items() if k.startswith(name)))

        self.rejected = total("kvmesh_watcher_rejected_total")
        self.events = total("kvmesh_watcher_events_total")
        self.tasks = total("kvmesh_watcher_tasks_published_total")
        self.task_bytes = total("kvmesh_watcher_task_bytes_published_total")
        self.broker_bytes = total("kvmesh_watcher_broker_bytes_written_total")
        if self.targets and self.targets_synced == self.targets and self.synced_at is None:
            self.synced_at = self._counts()
            self.synced_time = time.monotonic()

    def _counts(self) -> tuple[int, int, int, int]:
        return (self.events, self.tasks, self.task_bytes, self.broker_bytes)

    def mark_churn_end(self) -> None:
        self.churn_end = self._counts()

    @property
    def per_change(self) -> tuple[int, float, float, float] | None:
        """(source changes, and per change: tasks, payload bytes, bytes written to the
        broker) between the end of the initial sync and the end of the churn."""
        if self.synced_at is None or self.churn_end is None:
            return None
        events = self.churn_end[0] - self.synced_at[0]
        if events <= 0:
            return None
        tasks, size, written = (
            e - s for e, s in zip(self.churn_end[1:], self.synced_at[1:], strict=True)
        )
        return events, tasks / events, size / events, written / events


COLUMNS = (
    "source",
    "queue",
    "peak",
    "lag rev",
    "lag s",
    "synced keys",
    "ops applied",
    "events",
    "filtered",
    "targets synced",
    "state",
)


# what a terminal narrower than the full view shows (80 columns): fewer, shorter columns
# without vertical rules, and cluster names never cut
COMPACT = ("source", "queue", "lag s", "keys", "ops", "filt", "synced", "state")
COMPACT_BELOW = 120


def render(views: list[SourceView], title: str, width: int = 140) -> Table:
    """The live view for a terminal *width* columns wide."""
    names = max((len(v.source) for v in views), default=6)
    if width < COMPACT_BELOW:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        # long cluster names (Cilium allows 32 characters) take the room of ops, then filt
        dropped = {"ops"} if names + 59 > width else set()
        if names + 52 > width:
            dropped.add("filt")
        columns = [c for c in COMPACT if c not in dropped]
        for col in columns:
            if col == "source":
                table.add_column(col, no_wrap=True, min_width=names)
            elif col == "state":
                table.add_column(col, no_wrap=True)
            else:
                table.add_column(col, justify="right", no_wrap=True)
        for v in views:
            cells = {
                "source": v.source,
                "queue": _short(v.queue),
                "lag s": _short(v.lag_seconds),
                "keys": _short(v.synced_keys),
                "ops": _short(v.ops_applied),
                "filt": _short(v.rejected),
                "synced": f"{v.targets_synced}/{v.targets}",
                "state": "waiting" if v.waiting else v.state,
            }
            table.add_row(*(cells[c] for c in columns))
        return table
    table = Table(title=title)
    for col in COLUMNS:
        if col == "source":
            table.add_column(col, no_wrap=True, min_width=names)
        else:
            table.add_column(col, justify="right")
    for v in views:
        table.add_row(
            v.source,
            _n(v.queue),
            str(v.peak_queue),
            _n(v.lag_revisions),
            _n(v.lag_seconds),
            str(v.synced_keys),
            str(v.ops_applied),
            str(v.events),
            str(v.rejected),
            f"{v.targets_synced}/{v.targets}",
            v.state,
        )
    return table


def line(views: list[SourceView]) -> str:
    """The view as one line, for logs and pipes."""
    return "  ".join(
        f"{v.source}: queue={_n(v.queue)} lag={_n(v.lag_revisions)} lag_s={_n(v.lag_seconds)} "
        f"synced={v.synced_keys}" + (f" ({v.state})" if v.waiting else "")
        for v in views
    )


def scrape(port: int) -> dict[str, float]:
    """Read a Prometheus text endpoint into {series: value} (empty when unreachable)."""
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for row in text.splitlines():
        if row and not row.startswith("#"):
            series, _, value = row.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[series] = float(value)
    return out


def _short(v: float | None) -> str:
    """A number in at most 5 characters: 1234, 12.3k, 123k, 1.23M, 123M, 12.3G."""
    if v is None:
        return "-"
    if isinstance(v, float) and v < 100:
        return f"{v:.1f}"
    if v < 10_000:
        return str(round(v))
    for unit, size in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        if v < size * 1000:
            for digits in (2, 1, 0):
                text = f"{v / size:.{digits}f}{unit}"
                if len(text) <= 5:
                    return text
    return "huge"


def _n(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)
