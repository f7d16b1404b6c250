"""The Celery app module for `celery -A workers.app worker`.

It loads the config when imported: Celery's own CLI imports it by name, so the config file
must come from $KVMESH_CONFIG. `kvmesh worker --config F` builds the same app explicitly
instead.
"""

from __future__ import annotations

from pipeline.clients.celeryapp import on_worker_logging
from pipeline.config import load_settings
from pipeline.protocol.logs import configure

from .tasks import create_worker_app

on_worker_logging(configure)  # kvmesh's one-line format, Celery's own lines included
app = create_worker_app(load_settings(None))
