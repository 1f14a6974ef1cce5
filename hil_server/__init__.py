"""HIL Server: holds the questions, matches the person's replies to them, serves the MCP server's HTTP API."""

__version__ = "0.2.0"
