"""The source side: the watcher of one source cluster and its parts (the source feed, the
target records it keeps, the planners, the resync, the drain of removed sources)."""
