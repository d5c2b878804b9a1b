from mcp_sandboxes.cli import main

raise SystemExit(main())
