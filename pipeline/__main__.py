"""`python -m pipeline` runs the kvmesh CLI."""

from .cli import main

raise SystemExit(main())
