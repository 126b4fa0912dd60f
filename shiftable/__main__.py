"""`python -m shiftable` is `sma`."""

from shiftable.cli import main

raise SystemExit(main())
