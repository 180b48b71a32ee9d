"""Handing memory the process no longer uses back to the kernel.

CPython keeps small objects in its own arenas and everything larger (and whatever C
libraries allocate: libyaml's parser, pydantic-core's validation) in the C library's heap.
After the configuration file is parsed and validated, or a pipeline has started, the parse's
nodes and temporaries are freed, but glibc keeps the freed pages mapped for later use: they
stay in the process's resident memory until a later allocation happens to reuse them.
`malloc_trim(0)` returns every whole free page of every heap to the kernel (freed pages
in the middle of a heap too, by madvise). It costs a walk over the heaps, once per start or
reload, and changes no object.
"""

from __future__ import annotations

from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked_up = False


def _lookup() -> Callable[[int], int] | None:
    try:
        import ctypes

        function = ctypes.CDLL(None).malloc_trim  # glibc only: musl and others lack it
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the kernel; False where the C library cannot."""
    global _trim, _looked_up
    if not _looked_up:
        _trim, _looked_up = _lookup(), True
    if _trim is None:
        return False
    _trim(0)
    return True
