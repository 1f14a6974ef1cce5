"""hil-mcp: the MCP server (stdio) an AI agent uses to ask a person in WeCom and wait for the answer."""

from hil_protocol import __version__

__all__ = ["__version__"]
