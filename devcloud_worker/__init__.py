"""DevCloud Worker: inside the intranet, keeps a WebSocket to the HIL Server, sends to WeCom, forwards callbacks."""

from hil_protocol import __version__

__all__ = ["__version__"]
