"""What a long-running kvmesh process does with its heap once it has started."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Keep what exists now (modules, settings, clients: some 80,000 objects in a worker's
    main process) out of every later garbage collection, after collecting what is garbage
    already. Full collections of them took 55 ms over the watcher's initial sync of 50,000
    keys (18-26 ms with this), and 54-67 ms each, three times in a run of lag.py, in the
    worker's main process, which hands every message to the pool and acknowledges it
    (docs/performance-log.md).

    The price: an object frozen here that later becomes garbage inside a cycle is never
    freed. That happens once at most, for what lives at the start and is replaced later
    (the first broker connection, on a reconnect; a pool process's bookkeeping, if it is
    replaced): a bounded amount, not one that grows with uptime."""
    gc.collect()
    gc.freeze()
