"""The Celery app Flower runs with (`kvmesh flower`, or
`celery -A pipeline.tools.flowerapp flower`): the broker and the per-source queues, but no
task and no signing key. Flower shows queue depths and workers; whatever task it is asked to
send, workers drop unless it is signed.

Like `workers.app`, it reads the config file from $KVMESH_CONFIG when imported. It also
replaces Flower's SIGTERM handler, which a signal can make fail silently
(pipeline.tools.flowerstop).
"""

from __future__ import annotations

from pipeline.clients.celeryapp import create_app
from pipeline.config import load_settings
from pipeline.tools.flowerstop import replace_flowers_handler

replace_flowers_handler()
app = create_app(load_settings(None, keys=False))
