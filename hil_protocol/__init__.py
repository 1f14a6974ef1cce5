"""Code shared by the HIL Server and the DevCloud Worker: WeCom robot protocol and relay frames."""
