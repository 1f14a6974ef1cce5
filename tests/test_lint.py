"""The house style is checked with the tests, so CI (which runs the README's test command) enforces it: ruff's
rules from pyproject.toml (blind excepts included) and its formatting, over the whole tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check() -> None:
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_by_string_between_packages() -> None:
    # Each package has its own entry points; nothing loads another package's module from a string.
    offenders = []
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in ("tests", "bench", ".venv"):
            continue
        text = path.read_text(encoding="utf-8")
        if "importlib.import_module(" in text or "__import__(" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
