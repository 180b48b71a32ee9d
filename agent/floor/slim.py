"""asyncua's table of node id names, made only when something reads it.

`asyncua.ua.ObjectIdNames` maps each of the 14,772 standard node ids to its name: a dict and
its own int objects, about 1 MB in every process that imports asyncua. It is the inverse of
the `ObjectIds` class (whose names are the same string objects), and only a few of asyncua's
functions read it: naming a data type or a reference type from its id (XML export, custom
structures, relative paths), none of which the plant-floor server calls. `make_names_lazy()`
puts in its place a mapping that builds the same table from `ObjectIds` the first time it is
read, and keeps it. Runtime only; asyncua's files are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Mapping

from asyncua import ua
from asyncua.ua import object_ids, relative_path


class LazyObjectIdNames(Mapping[int, str]):
    """The names of the standard node ids by id, built from `ObjectIds` when first read."""

    def __init__(self) -> None:
        self._names: dict[int, str] | None = None

    def _table(self) -> dict[int, str]:
        if self._names is None:
            self._names = {
                value: name
                for name, value in vars(object_ids.ObjectIds).items()
                if not name.startswith("_") and isinstance(value, int)
            }
        return self._names

    def __getitem__(self, key: int) -> str:
        return self._table()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._table()

    def __iter__(self) -> Iterator[int]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def keys(self) -> KeysView[int]:
        return self._table().keys()


def make_names_lazy() -> None:
    """Replace asyncua's table of node id names (every module holding it) by the lazy one."""
    if isinstance(object_ids.ObjectIdNames, LazyObjectIdNames):
        return
    names = LazyObjectIdNames()
    for module in (ua, object_ids, relative_path):
        module.ObjectIdNames = names  # type: ignore[attr-defined]
