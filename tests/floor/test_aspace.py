"""The standard address space on disk: built once in a child process, read by later starts,
built again when an earlier build left no marker (a crash half way)."""

from __future__ import annotations

import shelve
import stat
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.server.server import Server

from agent.floor.aspace import ShelfIndex, ensure_shelf, init_server, shelf_path


async def test_shelf_is_built_once_and_serves_the_standard_nodes(tmp_path: Path) -> None:
    path = await ensure_shelf(tmp_path)
    assert path == shelf_path(tmp_path) and path.is_file()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    built = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
    assert len(built) > 1, built  # the marker and the shelf's own files
    # State files: the agent's user only, whatever the umask of the test run.
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()} == dict.fromkeys(
        built, 0o600
    )
    # A later start finds the shelf and writes nothing.
    assert await ensure_shelf(tmp_path) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()} == built
    server = Server()
    await server.init(shelf_file=path)
    node = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State))
    assert await node.read_browse_name() == ua.QualifiedName("State", 0)


async def test_a_shelf_left_readable_to_others_is_made_private_when_found(
    tmp_path: Path,
) -> None:
    path = await ensure_shelf(tmp_path)
    for part in path.parent.iterdir():
        part.chmod(0o644)  # as versions before this one wrote them under umask 022
    assert await ensure_shelf(tmp_path) == path
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()} == {0o600}


async def test_a_build_without_its_marker_is_made_again(tmp_path: Path) -> None:
    path = shelf_path(tmp_path)
    path.parent.mkdir(parents=True)
    half = path.parent / (path.name + ".dat")
    half.write_bytes(b"half a shelf")  # what a build killed half way leaves, without marker
    assert await ensure_shelf(tmp_path) == path
    assert path.is_file() and half.stat().st_size > len(b"half a shelf")


async def test_the_small_index_reads_every_node_of_the_shelf(tmp_path: Path) -> None:
    path = await ensure_shelf(tmp_path)
    index = ShelfIndex(path)
    with shelve.open(str(path), "r") as shelf:
        keys = list(shelf.keys())
        assert len(keys) > 1000
        for key in keys:
            assert key in index
            assert index[key].nodeid.to_string() == key == shelf[key].nodeid.to_string()
    assert "i=999999999" not in index and "ns=3;s=nothing" not in index
    with pytest.raises(KeyError):
        index["i=999999999"]


async def test_a_server_reads_the_standard_nodes_through_the_small_index(tmp_path: Path) -> None:
    path = await ensure_shelf(tmp_path)
    server = Server()
    await init_server(server, path)
    assert isinstance(server.iserver.aspace._nodes.source, ShelfIndex)
    from asyncua.server import address_space

    assert vars(address_space)["shelve"] is shelve  # asyncua's own again for anything else
    node = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_BuildInfo_ProductName))
    assert await node.read_browse_name() == ua.QualifiedName("ProductName", 0)
