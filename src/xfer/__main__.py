"""`python -m xfer ...` is the same as the `xfer` console script."""

from xfer.cli import main

raise SystemExit(main())
