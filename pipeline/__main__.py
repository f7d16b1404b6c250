"""`python -m pipeline` runs the kvmesh CLI."""

from pipeline.tools.cli import main

raise SystemExit(main())
