"""OPC UA's standard address space kept on disk, so the plant-floor server stays small.

asyncua builds the standard address space (about 50 MB of Python objects, 2 s of CPU) in
every server. It can instead read the nodes lazily from a `shelve` file, which costs the
server about 2 MB, but building that file needs the full address space in memory once. The
agent therefore builds it in a child process (its memory returns to the system when the
child ends) the first time the OPC UA server starts, in the state folder, once per asyncua
version: about 20 MB written once, read (never written) by every later start.

Crash safety: the shelf counts as present only when its marker file exists, and the marker is
written (and fsynced) after the child has written and fsynced the shelf. A child killed half
way leaves no marker: the next start builds the shelf again from scratch.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path


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
    with path.open("wb") as marker:
        marker.flush()
        os.fsync(marker.fileno())
    _fsync(folder)
    return path


async def _build(path: Path) -> None:
    from asyncua.server.server import Server

    # The shelf is written by asyncua right after it has filled the standard address space
    # (shelve with the dbm module this Python has; dbm.dumb here: path.dat and path.dir).
    await Server().init(shelf_file=path)


if __name__ == "__main__":
    asyncio.run(_build(Path(sys.argv[1])))
