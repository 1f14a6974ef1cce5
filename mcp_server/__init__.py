"""hil-mcp: the MCP server (stdio) an AI agent uses to ask a person in WeCom and wait for the answer."""

__version__ = "0.2.0"
