"""DevCloud Worker: inside the intranet, keeps a WebSocket to the HIL Server, sends to WeCom, forwards callbacks."""
