from cryptfuse.cli import main

raise SystemExit(main())
