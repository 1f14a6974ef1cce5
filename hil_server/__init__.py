"""HIL Server: holds the questions, matches the person's replies to them, serves the MCP server's HTTP API."""

from hil_protocol import __version__

__all__ = ["__version__"]
