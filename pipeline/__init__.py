"""kvmesh source side: configuration, Cilium key layout, filtering, sharding, batching,
the fence protocol, the watcher and the Celery app it publishes through."""

__version__ = "0.1.0"
