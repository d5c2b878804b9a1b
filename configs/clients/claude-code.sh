#!/usr/bin/env sh
# Register mcp-sandboxes with Claude Code. Pick one.
# stdio: Claude Code starts the server itself.
claude mcp add sandboxes --env ANTHROPIC_API_KEY="$ANTHROPIC_API_KEY" -- \
  /opt/mcp-sandboxes/.venv/bin/mcp-sandboxes serve --transport stdio
# streamable HTTP: against a service you started with
#   MCP_SANDBOXES_AUTH_TOKEN=secret mcp-sandboxes serve --transport http --port 8765
# claude mcp add --transport http sandboxes http://127.0.0.1:8765/mcp --header "Authorization: Bearer secret"
