"""The package layers hold: tools -> source | workers -> clients -> config -> protocol,
only pipeline.clients imports etcd3, grpc, redis, celery or kombu, and of those only
pipeline.clients.etcd imports etcd3 or grpc (the contracts are in pyproject.toml, checked by
import-linter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_point_one_way() -> None:
    """lint-imports keeps all three contracts."""
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count(" KEPT") == 3, res.stdout[-2000:]
