"""What both sides of kvmesh agree on, as pure code (no socket, no file, no clock read at
import): the Cilium key layout, sharding, the fence protocol and its records, the task wire
format and its signatures, batching, snapshots and diffs, and every name that must stay
stable. It imports nothing else of kvmesh."""
