from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Stack

pytest_plugins = ["tests.server_fixtures", "tests.conftest_pg"]


@pytest.fixture(params=["direct", "relay"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The whole suite as real processes, in each mode."""
    s = Stack(mode=request.param, tmp=tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(s.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
