"""The Celery app module for `celery -A workers.app worker`.

This is the one module that reads the environment when imported: Celery's own CLI imports
it by name, so the config file must come from $KVMESH_CONFIG. `kvmesh worker --config F`
builds the same app explicitly instead.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from pipeline.config import load_settings
from pipeline.logs import configure

from .tasks import create_worker_app


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _logging(loglevel: Any = None, **_: Any) -> None:
    """kvmesh's one-line format for the worker and Celery's own lines alike."""
    configure(loglevel or "INFO")


app = create_worker_app(load_settings(None))
