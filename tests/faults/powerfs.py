"""A FUSE file system that loses, on power loss, every write not yet fsynced.

Pass-through to a backing folder, with one difference that matters to a database: file data
written is kept in memory (whole 4 KiB pages) and reaches the backing file only when the file
is fsynced. `PowerFs.power_loss()` kills the file system's process (SIGKILL): what was not
fsynced is gone, as on an edge box whose power is cut. `mount()` again shows the backing
folder as the next boot would find it. File creation, rename and removal are durable at
once (SQLite fsyncs the folder after them anyway).

Run by `PowerFs(backing, mountpoint).mount()`; the file system serves from a child process
(`python -m tests.faults.powerfs BACKING MOUNTPOINT`). Needs /dev/fuse, fusermount and the
mfusepy package (libfuse 3).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAGE = 4096


def fuse_problem() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if not Path("/dev/fuse").exists():
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy cannot be loaded: {exc}"
    return None


class PowerFs:
    """The file system process: `mount()`, `power_loss()`, `unmount()`."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.losses = 0

    def mount(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.faults.powerfs",
                    str(self.backing),
                    str(self.mountpoint),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + 20
        while not self.mounted():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"powerfs did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def mounted(self) -> bool:
        # From the mount table: a mount whose server died fails stat() (ENOTCONN).
        target = str(self.mountpoint.resolve())
        with open("/proc/self/mounts", encoding="utf-8") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)

    def _fusermount_u(self) -> None:
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
        for _ in range(50):
            if not self.mounted():
                return
            subprocess.run(
                [tool, "-u", "-z", str(self.mountpoint)], check=False, capture_output=True
            )
            time.sleep(0.1)
        raise RuntimeError(f"{self.mountpoint} stays mounted")

    def power_loss(self) -> None:
        """Cut the power: every write not fsynced is lost. Processes using the mount must be
        gone first (a killed agent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._fusermount_u()
        self.losses += 1

    def unmount(self) -> None:
        """A clean shutdown: nothing is lost (everything was fsynced or is dropped anyway)."""
        self.power_loss()


# -- the file system (child process) ---------------------------------------------------------


class _Overlay:
    """Unsynced state of one file: its size and the pages written since the last fsync."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.floor = size  # backing bytes at or past this offset read as zeros (truncated)
        self.pages: dict[int, bytearray] = {}


def _operations() -> Any:
    from mfusepy import FuseOSError, Operations

    class Volatile(Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self, root: str) -> None:
            self.root = root
            self.files: dict[str, _Overlay] = {}

        def _full(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _backing_page(self, path: str, index: int, floor: int) -> bytearray:
            page = bytearray(PAGE)
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self._full(path), os.O_RDONLY)
                try:
                    data = os.pread(fd, PAGE, index * PAGE)
                finally:
                    os.close(fd)
                page[: len(data)] = data
            cut = floor - index * PAGE
            if cut < PAGE:
                page[max(0, cut) :] = bytes(PAGE - max(0, cut))
            return page

        def _overlay(self, path: str) -> _Overlay:
            overlay = self.files.get(path)
            if overlay is None:
                overlay = _Overlay(os.path.getsize(self._full(path)))
                self.files[path] = overlay
            return overlay

        # metadata: passed through, durable at once
        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            try:
                st = os.lstat(self._full(path))
            except OSError as exc:
                raise FuseOSError(exc.errno) from None
            attrs = {
                k: getattr(st, k)
                for k in (
                    "st_mode",
                    "st_nlink",
                    "st_uid",
                    "st_gid",
                    "st_size",
                    "st_atime",
                    "st_mtime",
                    "st_ctime",
                )
            }
            overlay = self.files.get(path)
            if overlay is not None:
                attrs["st_size"] = overlay.size
            return attrs

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", *os.listdir(self._full(path))]

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._full(path), amode):
                raise FuseOSError(errno.EACCES)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._full(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._full(path), uid, gid)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._full(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._full(path))
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._full(path))
            self.files.pop(path, None)
            return 0

        def rename(self, old: str, new: str) -> int:
            os.rename(self._full(old), self._full(new))
            if old in self.files:
                self.files[new] = self.files.pop(old)
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            os.utime(self._full(path), ns=times)
            return 0

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._full(path))
            return {
                k: getattr(st, k)
                for k in (
                    "f_bavail",
                    "f_bfree",
                    "f_blocks",
                    "f_bsize",
                    "f_favail",
                    "f_ffree",
                    "f_files",
                    "f_flag",
                    "f_frsize",
                    "f_namemax",
                )
            }

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            fd = os.open(self._full(path), os.O_WRONLY | os.O_CREAT, mode)
            os.close(fd)
            return 0

        def open(self, path: str, flags: int) -> int:
            if not os.path.exists(self._full(path)):
                raise FuseOSError(errno.ENOENT)
            if flags & os.O_TRUNC:
                self.truncate(path, 0)
            return 0

        # data: kept in memory until fsync
        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            overlay = self.files.get(path)
            if overlay is None:
                fd = os.open(self._full(path), os.O_RDONLY)
                try:
                    return os.pread(fd, size, offset)
                finally:
                    os.close(fd)
            end = min(offset + size, overlay.size)
            out = bytearray()
            pos = offset
            while pos < end:
                index, within = divmod(pos, PAGE)
                page = overlay.pages.get(index) or self._backing_page(path, index, overlay.floor)
                take = min(PAGE - within, end - pos)
                out += page[within : within + take]
                pos += take
            return bytes(out)

        def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
            overlay = self._overlay(path)
            pos = 0
            while pos < len(data):
                index, within = divmod(offset + pos, PAGE)
                page = overlay.pages.get(index)
                if page is None:
                    page = self._backing_page(path, index, overlay.floor)
                    overlay.pages[index] = page
                take = min(PAGE - within, len(data) - pos)
                page[within : within + take] = data[pos : pos + take]
                pos += take
            overlay.size = max(overlay.size, offset + len(data))
            return len(data)

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            overlay = self._overlay(path)
            if length < overlay.size:
                for index in [i for i in overlay.pages if i * PAGE >= length]:
                    del overlay.pages[index]
                last = overlay.pages.get(length // PAGE)
                if last is not None:
                    cut = length % PAGE
                    last[cut:] = bytes(PAGE - cut)
                overlay.floor = min(overlay.floor, length)
            overlay.size = length
            return 0

        def fsync(self, path: str, datasync: int, fh: Any) -> int:
            overlay = self.files.pop(path, None)
            if overlay is None:
                return 0
            fd = os.open(self._full(path), os.O_WRONLY)
            try:
                os.ftruncate(fd, min(os.fstat(fd).st_size, overlay.floor))
                for index, page in sorted(overlay.pages.items()):
                    start = index * PAGE
                    if start < overlay.size:
                        os.pwrite(fd, bytes(page[: overlay.size - start]), start)
                os.ftruncate(fd, overlay.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: Any) -> int:
            return 0

        def flush(self, path: str, fh: Any) -> int:
            return 0  # close() is not a sync

        def release(self, path: str, fh: Any) -> int:
            return 0

    return Volatile


def main() -> None:
    from mfusepy import FUSE

    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(_operations()(backing), mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    main()
