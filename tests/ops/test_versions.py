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


def test_the_version_is_read_as_importlib_metadata_reads_it(tmp_path: Path) -> None:
    from sync.version import UNKNOWN, VERSION, installed_version

    assert importlib.metadata.version("factory-edge-gateway") == VERSION
    # The first folder on the path that holds the distribution wins, its name normalized.
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, dist, version in (
        (first, "Factory.Edge_Gateway-2.0.dist-info", "2.0"),
        (second, "factory_edge_gateway-1.0.dist-info", "1.0"),
        (first, "factory_edge_gateway_extra-9.0.dist-info", "9.0"),
    ):
        (folder / dist).mkdir(parents=True)
        (folder / dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: x\nVersion: {version}\n\nVersion: body text\n"
        )
    empty.mkdir()
    for folders in ([empty, first, second], [second, first], [first]):
        path = [str(p) for p in folders]
        found = importlib.metadata.distributions(name="factory-edge-gateway", path=path)
        assert installed_version(path=path) == next(iter(found)).version
    assert installed_version(path=[str(empty), str(first), str(second)]) == "2.0"
    assert installed_version(path=[str(second), str(first)]) == "1.0"
    assert installed_version(path=[str(empty), str(tmp_path / "missing")]) == UNKNOWN
