"""`python -m nydusd` runs the daemon, exactly like the `nydusd` console script."""

from nydusd.cli.daemon import main

raise SystemExit(main())
