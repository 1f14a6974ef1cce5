"""Code shared by the HIL Server and the DevCloud Worker: WeCom robot protocol and relay frames.

`__version__` is the release's one version: the package metadata reads it from here (pyproject's dynamic version),
and every process reports it.
"""

__version__ = "0.3.0"
