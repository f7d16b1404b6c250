"""What runs kvmesh and looks at it: the CLI, the mesh lab and its simulated Cilium control
plane, local servers, the read-only views behind `verify` and `status`."""
