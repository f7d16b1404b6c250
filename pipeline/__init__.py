"""kvmesh: a cache of every Cilium cluster's state in every other cluster's etcd.

    pipeline.tools      cli, lab, simulate, servers, report          (runs and inspects)
    pipeline.source     the watcher and its parts    workers (the apply side, beside it)
    pipeline.clients    etcd, Redis, Celery: the only modules that do I/O on the network
    pipeline.config     settings
    pipeline.protocol   layout, sharding, fence, wire, batching, names: pure

Each layer imports only those below it (tests/unit/test_imports.py holds it to that).
"""

__version__ = "0.1.0"
