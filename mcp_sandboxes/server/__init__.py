"""The MCP surface: tools, resources and transports. Knows MCP, nothing about engines."""
