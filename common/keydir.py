"""Key directories and key files: one set of rules for every kind of key of both sides.

Every key file is one text line (or a few, for public key lists). Private key files are 0600,
written atomically (a fresh O_EXCL temp file created with the final mode, fsync, rename or
hard link, fsync of the directory) and refused on load when group or other have any access.
Directories created here are 0700 (an existing directory keeps its mode: it may be shared).

A key ring is a directory of `<kind>-<kid>.key` files with a `<kind>.current` pointer naming
the key for new work; older keys stay for what they sealed or signed (rotation). The kinds
in use: `hpke`, `ack` (sync.keys, the cloud's envelope and ack keys), `jwt` (cloud_api.auth,
token signing), `pii` (cloud_api.pii, personal data at rest). The agent's own directory
holds fixed names (`signing.key`, `cloud-*.pub`; sync.keys) and the OPC UA client key
(connectors.opcua.certs). Errors are KeyFileError and name the file or directory that was
looked at.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

K = TypeVar("K")

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIRECTORY_MODE = 0o700


class KeyFileError(Exception):
    """A key file, key line or key directory is missing, malformed, unsafe, inconsistent, or
    would be overwritten."""


def ensure_directory(directory: Path) -> Path:
    """Create `directory` (and missing parents) 0700; an existing one is left as it is."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        for path in reversed(missing):
            path.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
            os.chmod(path, DIRECTORY_MODE)  # the umask may have narrowed it; make it exact
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {directory}: {exc}") from exc
    return directory


def write_atomic(path: Path, text: str | bytes, *, mode: int, overwrite: bool) -> None:
    """Write via a fresh O_EXCL temp file with the final mode, fsync, then rename into place.

    The temp file is created with ``mode`` from the start, so a private key is never readable
    by others, not even for an instant. Without ``overwrite`` the final step is a hard link,
    which fails atomically if the target exists (no check-then-write race).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; make it exact
            fh.write(text.encode("ascii") if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(f"{path} exists; pass overwrite=True to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private_line(path: Path, line: str, *, overwrite: bool = False) -> None:
    """A private key file: one line, 0600, never replaced unless `overwrite`."""
    write_atomic(path, line + "\n", mode=PRIVATE_MODE, overwrite=overwrite)


def write_public_lines(path: Path, lines: list[str], *, overwrite: bool = True) -> None:
    """A public file (public keys, a `.current` pointer): one item a line, 0644."""
    write_atomic(path, "".join(f"{ln}\n" for ln in lines), mode=PUBLIC_MODE, overwrite=overwrite)


def read_private(path: Path) -> str:
    """The text of a private key file; refused when group or other have any access."""
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(f"{path} is accessible by group/other; chmod 600 it")
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc}") from exc


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a public file, `#` comments left out."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from exc
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def key_path(directory: Path, kind: str, kid: str) -> Path:
    return directory / f"{kind}-{kid}.key"


def load_ring(
    directory: Path,
    kind: str,
    load: Callable[[Path], K],
    key_id: Callable[[K], str] | None = None,
) -> dict[str, K]:
    """Every `<kind>-<kid>.key` of `directory` by key id (none when it does not exist).

    With `key_id` the id is computed from the key and must be the one in the file name (a
    renamed or copied file is refused); without it the file name gives the id.
    """
    keys: dict[str, K] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.glob(f"{kind}-*.key")):
        key = load(path)
        named = path.name[len(kind) + 1 : -len(".key")]
        kid = named if key_id is None else key_id(key)
        if path.name != f"{kind}-{kid}.key":
            raise KeyFileError(f"{path} holds key {kid}; its name must be {kind}-{kid}.key")
        keys[kid] = key
    return keys


def current_pointer(directory: Path, kind: str) -> Path:
    return directory / f"{kind}.current"


def read_current(directory: Path, kind: str, keys: Mapping[str, object]) -> list[str]:
    """The key ids `<kind>.current` names, each present in `keys` (at least one)."""
    pointer = current_pointer(directory, kind)
    lines = read_lines(pointer)
    if not lines or any(kid not in keys for kid in lines):
        raise KeyFileError(f"{pointer} must name keys present in {directory}")
    return lines


def read_one_current(
    directory: Path, kind: str, keys: Mapping[str, object], *, required: bool = True
) -> str | None:
    """The one key id `<kind>.current` names; None when there is no pointer and not required."""
    pointer = current_pointer(directory, kind)
    if not required and not pointer.exists():
        return None
    lines = read_lines(pointer)
    if len(lines) != 1 or lines[0] not in keys:
        raise KeyFileError(f"{pointer} must name one key present in {directory}")
    return lines[0]


def store_current(directory: Path, kind: str, kids: list[str]) -> None:
    """Point `<kind>.current` at `kids`; written after the keys, so it never names a key that
    is not on disk."""
    write_public_lines(current_pointer(directory, kind), kids)


__all__ = [
    "DIRECTORY_MODE",
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "KeyFileError",
    "ensure_directory",
    "key_path",
    "load_ring",
    "read_current",
    "read_lines",
    "read_one_current",
    "read_private",
    "store_current",
    "write_atomic",
    "write_private_line",
    "write_public_lines",
]
