"""Both command-line tools say which release they are, from the installed package metadata."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tool", ["edge-agent", "cloud-api"])
def test_version_comes_from_the_package_metadata(tool: str) -> None:
    result = subprocess.run(
        [str(BIN / tool), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    expected = importlib.metadata.version("factory-edge-gateway")
    assert result.stdout == f"{tool} {expected}\n"
