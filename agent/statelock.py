"""One agent per state folder: an exclusive lock held for the agent's whole life.

Two agents on one state folder would resume from the same engine state and append to the same
outbox, so the cloud would count their parts twice. `edge-agent run` takes an exclusive
flock(2) on `<state_dir>/agent.lock` before it opens anything else and keeps it until the
process ends; the kernel drops it when the process dies (kill -9, power loss), so nothing
stale is left behind. The file holds the PID of the holder, for the error a second start
prints. Read-only commands (status, buffer stats, keys status, validate) do not take the
lock; `is_held` tells them whether an agent runs, so they ask it instead of opening the
outbox it holds exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "agent.lock"


class StateFolderBusy(Exception):
    """Another process holds the state folder's lock."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder = folder
        self.pid = pid
        holder = f"PID {pid}" if pid is not None else "a process whose PID is not known yet"
        super().__init__(
            f"the state folder {folder} is in use by another edge-agent ({holder}); "
            "one agent per state folder (a second one would count every part twice)"
        )


class StateFolderLock:
    """The held lock; `release()` (or process exit) gives it up."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def holder_pid(folder: Path) -> int | None:
    """The PID written by the process that holds (or last held) the lock."""
    with contextlib.suppress(OSError, ValueError):
        return int((folder / LOCK_NAME).read_text(encoding="ascii").strip())
    return None


def lock_state_folder(folder: Path) -> StateFolderLock:
    """Take the folder's lock without waiting; raises StateFolderBusy when it is held."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateFolderBusy(folder, holder_pid(folder)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return StateFolderLock(folder, fd)


def is_held(folder: Path) -> bool:
    """Whether a process (a running agent) holds the folder's lock now, without taking it.

    Read from /proc/locks, so a command asking never makes an agent starting at that instant
    fail; where /proc/locks cannot be read, a shared lock is tried and given back at once."""
    path = folder / LOCK_NAME
    try:
        st = os.stat(path)
    except OSError:
        return False
    try:
        with open("/proc/locks", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return _probe(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a waiter: "1: -> FLOCK ...")
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode:
            return True
    return False


def _probe(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock if it was taken
    return False
