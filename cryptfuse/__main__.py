"""``python -m cryptfuse``: the command line."""

from cryptfuse.cli import main

raise SystemExit(main())
