"""OPC UA's standard address space kept on disk, so the plant-floor server stays small.

asyncua builds the standard address space (about 50 MB of Python objects, 2 s of CPU) in
every server. It can instead read the nodes lazily from a `shelve` file, which costs the
server about 2 MB, but building that file needs the full address space in memory once. The
agent therefore builds it in a child process (its memory returns to the system when the
child ends) the first time the OPC UA server starts, in the state folder, once per asyncua
version: about 20 MB written once, read (never written) by every later start.

The shelf's own index (dbm.dumb's: a dict of tuples, about 1.2 MB in every server) is never
read: `init_server` has asyncua open the shelf as a `ShelfIndex`, 12 bytes a node in three
arrays. (Reading dbm.dumb's index and then dropping it left about 1.4 MB of the heap behind.)

Crash safety: the shelf counts as present only when its marker file exists, and the marker is
written (and fsynced) after the child has written and fsynced the shelf. A child killed half
way leaves no marker: the next start builds the shelf again from scratch.

Its files are the agent's state and are created 0600 in a 0700 folder whatever the umask (the
child builds under umask 077); a shelf an earlier version left readable to others is made
0600 when it is found.
"""

from __future__ import annotations

import ast
import asyncio
import bisect
import os
import pickle
import re
import shutil
import sys
from array import array
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def shelf_path(state_dir: Path) -> Path:
    """Where the shelf of the installed asyncua version lives (its marker is this file)."""
    return state_dir / "opcua-address-space" / f"asyncua-{version('asyncua')}" / "standard"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def ensure_shelf(state_dir: Path) -> Path:
    """The shelf of the standard address space, built in a child process when missing."""
    path = shelf_path(state_dir)
    if path.is_file():
        for part in path.parent.iterdir():
            if part.stat().st_mode & 0o077:
                part.chmod(0o600)
        return path
    folder = path.parent
    # Shelves of other asyncua versions are of no use any more.
    if folder.parent.is_dir():
        for other in folder.parent.iterdir():
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in folder.iterdir():
        stale.unlink()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.floor.aspace",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await child.communicate()
    if child.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"building the OPC UA address space failed: {tail[0]}")
    for part in folder.iterdir():
        _fsync(part)
    marker = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fsync(marker)
    finally:
        os.close(marker)
    _fsync(folder)
    return path


_NUMERIC = re.compile(r"'i=(\d+)', \((\d+), (\d+)\)")


def _smallest(values: list[int]) -> array[int]:
    """`values` in an array of 4-byte items when they fit, else of 8-byte ones."""
    return array("I" if max(values, default=0) < 2**32 else "Q", values)


class ShelfIndex:
    """Reads the nodes of a shelf written with dbm.dumb (`path.dir` lists where each pickled
    node lies in `path.dat`) by their node id string, as `shelve` does, from an index of
    three arrays for the numeric ids of namespace 0 (all the standard address space has)."""

    def __init__(self, path: Path) -> None:
        self.data = path.with_name(path.name + ".dat")
        rows: list[tuple[int, int, int]] = []
        self.other: dict[str, tuple[int, int]] = {}
        with path.with_name(path.name + ".dir").open(encoding="Latin-1") as listing:
            for line in listing:
                found = _NUMERIC.fullmatch(line.rstrip())
                if found is not None:
                    rows.append((int(found[1]), int(found[2]), int(found[3])))
                    continue
                key, (pos, size) = ast.literal_eval(line)
                self.other[key] = (pos, size)
        rows.sort()
        self.ids = _smallest([r[0] for r in rows])
        self.positions = _smallest([r[1] for r in rows])
        self.sizes = _smallest([r[2] for r in rows])

    def _find(self, key: str) -> tuple[int, int] | None:
        if key.startswith("i=") and key[2:].isdigit():
            number = int(key[2:])
            at = bisect.bisect_left(self.ids, number)
            if at < len(self.ids) and self.ids[at] == number:
                return self.positions[at], self.sizes[at]
            return None
        return self.other.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(key) is not None

    def __getitem__(self, key: str) -> Any:
        where = self._find(key)
        if where is None:
            raise KeyError(key)
        with self.data.open("rb") as data:
            data.seek(where[0])
            return pickle.loads(data.read(where[1]))

    def close(self) -> None:
        """Nothing to close: each read opens the data file."""


async def init_server(server: Any, shelf: Path | None) -> None:
    """`server.init(shelf_file=shelf)`, with asyncua reading the shelf through `ShelfIndex`
    (`shelf` None: the standard address space in memory, as asyncua does by default)."""
    if shelf is None:
        await server.init()
        return
    from asyncua.server import address_space

    namespace = vars(address_space)
    real = namespace["shelve"]
    # asyncua's loader calls `shelve.open(str(path), "r")` and reads nodes by key from it.
    namespace["shelve"] = SimpleNamespace(open=lambda path, flag="r": ShelfIndex(Path(path)))
    try:
        await server.init(shelf_file=shelf)
    finally:
        namespace["shelve"] = real


async def _build(path: Path) -> None:
    from asyncua.server.server import Server

    # The shelf is written by asyncua right after it has filled the standard address space
    # (shelve with the dbm module this Python has; dbm.dumb here: path.dat and path.dir),
    # readable by the agent's user only.
    os.umask(0o077)
    await Server().init(shelf_file=path)


if __name__ == "__main__":
    asyncio.run(_build(Path(sys.argv[1])))
