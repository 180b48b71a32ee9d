"""What asyncua makes a process import and keep that the plant-floor server never uses.

Three things, all at run time (asyncua's files are untouched):

`deferred(groups)` is a context manager around the first import of asyncua: while it is open,
a module of one of the groups (a module name and the modules under it, e.g. `asyncua.pubsub`)
is not executed but replaced by a placeholder module, and a name imported from a placeholder
(`from ..pubsub.pubsub import PubSub`) by a stand-in (`DeferredName`). The first use of a
placeholder or of a stand-in (an attribute, a call, `isinstance`, a subclass) imports the real
modules of its group and puts them and their objects in the place of every placeholder and
stand-in of that group that a module holds: code that uses one runs as it would have without
`deferred`, only later. When the context closes, the placeholders leave `sys.modules`, so a
module imported afterwards (the OPC UA client of an agent polling an OPC UA PLC) gets the real
modules. asyncua's server module imports its client, pub/sub, XML import and export, their
date and time zone libraries (dateutil, pytz), the code loading custom structures and the
event types, and the server calls none of it unless asked to (`import_xml`, `export_xml`,
`get_pubsub`, `register_to_discovery`, `load_data_type_definitions`, `get_event_generator`);
`UNUSED_BY_SERVER` lists them.

`make_names_lazy()` replaces `asyncua.ua.ObjectIdNames`, which maps each of the 14,772 standard
node ids to its name (a dict and its own int objects, about 1 MB), the inverse of the
`ObjectIds` class (whose names are the same string objects), by a mapping that builds the same
table from `ObjectIds` the first time it is read, and keeps it. Only a few of asyncua's
functions read it: naming a data type or a reference type from its id (XML export, custom
structures, relative paths), none of which the plant-floor server calls.

`compact_object_ids()` replaces the `ObjectIds` class itself (one attribute per standard node
id) by a class of the same name whose ids are looked up in one sorted table of the names and
kept as attributes once asked for (see its docstring).

`lazy_dataclass_methods()` is a context manager around the same first import: a dataclass
made while it is open gets its generated `__init__`, `__repr__`, `__eq__`, ordering and
`__hash__` as `LazyMethod`s, each made (by `dataclasses`' own code, from the arguments it was
given) the first time it is used and then put in its class as the plain function. asyncua
defines 443 dataclasses, nearly all in `asyncua.ua`; each method `dataclasses` makes is
compiled from source (`exec`) and its code kept, about 4 kB a class, and a server uses the
methods of a few dozen of them. (Under `-OO` a dataclass without a docstring is also given one
from `inspect.signature`, which would make the `__init__`; in the context it gets its name.)
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import itertools
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator, KeysView, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What asyncua's server imports and the plant-floor server does not run (see the module
# docstring); each is imported when first used. `tests/floor/test_slim.py` checks that a
# running server with clients reading and subscribing loads none of them.
UNUSED_BY_SERVER = (
    "asyncua.client",  # Client (register_to_discovery), UaSession
    "asyncua.pubsub",  # get_pubsub
    "asyncua.common.xmlimporter",  # import_xml
    "asyncua.common.xmlexporter",  # export_xml
    "asyncua.common.xmlparser",
    "asyncua.common.structures",  # load_type_definitions, load_enums
    "asyncua.common.structures104",  # load_data_type_definitions
    "asyncua.common.event_objects",  # get_event_generator, condition methods (not bound)
    "asyncua.common.events",
    "dateutil.parser",  # string_to_val of a DateTime (XML import)
    "pytz",  # XML import
    "xml.etree",  # XML import and export, structures' type dictionaries
)

# What protobuf imports and never runs when its messages are upb's (the C implementation
# its wheels ship): the pure-Python message classes, with their decoder, encoder and text
# format (about 0.6 MB). Imported when first used, as when protobuf runs in pure Python.
UNUSED_WITH_UPB = ("google.protobuf.internal.python_message",)

_lock = threading.RLock()
_method_lock = threading.Lock()


def _group_of(name: str, groups: Sequence[str]) -> str | None:
    for group in groups:
        if name == group or name.startswith(group + "."):
            return group
    return None


class _Placeholder(types.ModuleType):
    """A module not executed yet; its first use imports the real one (see `_Deferrer`)."""

    def __getattr__(self, attr: str) -> Any:
        deferrer: _Deferrer = self.__dict__["_deferrer"]
        if attr.startswith("__") and attr.endswith("__"):
            if attr == "__path__":  # asked by the import system: not a package
                raise AttributeError(attr)
            return getattr(deferrer.real_module(self.__name__), attr)
        if deferrer.open:
            # `from module import name` while deferring: a stand-in, resolved when used.
            return DeferredName(deferrer, self.__name__, attr)
        return getattr(deferrer.real_module(self.__name__), attr)


class DeferredName:
    """A name imported from a placeholder module; its first use imports the real module and
    the real object takes the stand-in's place in every module that holds it."""

    __slots__ = ("_attr", "_deferrer", "_module")

    def __init__(self, deferrer: _Deferrer, module: str, attr: str) -> None:
        self._deferrer = deferrer
        self._module = module
        self._attr = attr

    def _target(self) -> Any:
        module = self._deferrer.real_module(self._module)
        try:
            return getattr(module, self._attr)
        except AttributeError:
            if not hasattr(module, "__path__"):
                raise
            # `from package import submodule`, as the import system does it
            return importlib.import_module(f"{self._module}.{self._attr}")

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __instancecheck__(self, obj: object) -> bool:
        return isinstance(obj, self._target())

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self._target())

    def __mro_entries__(self, bases: tuple[object, ...]) -> tuple[Any, ...]:
        return (self._target(),)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._attr}>"


class _Deferrer(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The finder and loader of the placeholders of `groups`."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.groups = tuple(groups)
        self.loaded: set[str] = set()  # groups imported for real
        self.open = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        group = _group_of(fullname, self.groups)
        if group is None or group in self.loaded:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None:
            return None  # no such module: the import fails as it would have
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=real.origin)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Placeholder(spec.name)
        module.__dict__["_deferrer"] = self
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass

    def real_module(self, name: str) -> types.ModuleType:
        """Imports the real modules of `name`'s group (once) and puts them in place."""
        with _lock:
            group = _group_of(name, self.groups)
            if group is not None and group not in self.loaded:
                self.loaded.add(group)
                for held in [m for m, v in sys.modules.items() if _group_of(m, (group,))]:
                    if isinstance(sys.modules[held], _Placeholder):
                        del sys.modules[held]
                importlib.import_module(name)
                self._replace(group)
            module = sys.modules.get(name)
            if module is None or isinstance(module, _Placeholder):
                module = importlib.import_module(name)
            return module

    def _replace(self, group: str) -> None:
        """Puts the real objects of `group` where its placeholders and stand-ins are held."""
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                if isinstance(value, _Placeholder) and _group_of(value.__name__, (group,)):
                    namespace[key] = importlib.import_module(value.__name__)
                elif type(value) is DeferredName and _group_of(value._module, (group,)):
                    namespace[key] = value._target()


@contextmanager
def deferred(groups: Sequence[str] = UNUSED_BY_SERVER) -> Iterator[None]:
    """Imports in this context leave the modules of `groups` not yet imported unexecuted
    until first used (see the module docstring)."""
    deferrer = _Deferrer(groups)
    deferrer.open = True
    sys.meta_path.insert(0, deferrer)
    try:
        yield
    finally:
        deferrer.open = False
        sys.meta_path.remove(deferrer)
        with _lock:
            for name, module in list(sys.modules.items()):
                if isinstance(module, _Placeholder) and module.__dict__["_deferrer"] is deferrer:
                    del sys.modules[name]


class _CompactIdsType(type):
    """The type of the compact `ObjectIds`: a name not looked up yet is found in the table
    (by a 64-bit hash of the name) and kept as a class attribute, so the next lookup is a
    plain attribute's. Every name and id (`standard_ids`) are read from asyncua's source."""

    _keys: array.array[int]  # the names' hashes, sorted
    _ids: array.array[int]  # each hash's node id
    _source: str  # asyncua's object_ids.py

    def __getattr__(cls, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        key = _name_key(name.encode())
        at = bisect.bisect_left(cls._keys, key)
        if at < len(cls._keys) and cls._keys[at] == key:
            value = cls._ids[at]
            type.__setattr__(cls, name, value)
            return value
        raise AttributeError(f"type object 'ObjectIds' has no attribute '{name}'")

    def standard_ids(cls) -> Iterator[tuple[str, int]]:
        """Every name and node id of the table."""
        return ((name.decode(), value) for name, value in _source_ids(Path(cls._source)))


# asyncua's object_ids.py: `class ObjectIds:` with one `    Name = 123` line per id, then
# `ObjectIdNames[123] = 'Name'` lines.
_CLASS_HEAD = b"\nclass ObjectIds:\n"
_ID_LINE = re.compile(rb"^    ([A-Za-z_][A-Za-z0-9_]*) = ([0-9]+)$", re.MULTILINE)
_MIN_IDS = 1000  # fewer means the file is not what this was written for


def _name_key(name: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")


def _source_ids(source: Path) -> Iterator[tuple[bytes, int]]:
    """The names and ids of the class `ObjectIds` in asyncua's source file (none when the
    file does not hold it)."""
    data = source.read_bytes()
    head = data.find(_CLASS_HEAD)
    if head < 0:
        return
    body_end = data.find(b"\n\n", head + len(_CLASS_HEAD))
    for found in _ID_LINE.finditer(data, head, len(data) if body_end < 0 else body_end):
        yield found[1], int(found[2])


def _compact_class(source: Path, module: str) -> type | None:
    """The compact `ObjectIds` of asyncua's `source`, or None when it cannot be made: no
    source, not the expected shape, or two names of the same hash."""
    try:
        keyed = sorted((_name_key(name), value) for name, value in _source_ids(source))
    except OSError:
        return None
    if len(keyed) < _MIN_IDS:
        return None
    keys = array.array("Q", (key for key, _ in keyed))
    wide = max(value for _, value in keyed) >= 2**32
    ids = array.array("Q" if wide else "I", (value for _, value in keyed))
    del keyed
    if any(a == b for a, b in itertools.pairwise(keys)):
        return None
    compact = _CompactIdsType("ObjectIds", (), {"__module__": module, "__qualname__": "ObjectIds"})
    type.__setattr__(compact, "_keys", keys)
    type.__setattr__(compact, "_ids", ids)
    type.__setattr__(compact, "_source", str(source))
    return compact


def _standard_ids(ids: type) -> Iterator[tuple[str, int]]:
    if isinstance(ids, _CompactIdsType):
        return ids.standard_ids()
    return (
        (name, value)
        for name, value in vars(ids).items()
        if not name.startswith("_") and isinstance(value, int)
    )


def compact_object_ids() -> None:
    """Replace `asyncua.ua.ObjectIds`, a class with one attribute per standard node id (14,772
    names of 75 bytes on average, their ints and the class's dict: about 2.6 MB), in every
    module that holds it, by a class of the same name that finds an id by the hash of its
    name in two arrays (about 120 kB) the first time it is asked for, and then keeps it.
    For asyncua imported before `object_ids_from_source` could make it so."""
    from asyncua.ua import object_ids

    old = object_ids.ObjectIds
    if isinstance(old, _CompactIdsType) or object_ids.__file__ is None:
        return
    compact = _compact_class(Path(object_ids.__file__), old.__module__)
    if compact is None:
        return
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            if value is old:
                namespace[key] = compact


class _ObjectIdsLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `asyncua.ua.object_ids` from its source text without running it (see
    `object_ids_from_source`); asyncua's own code when the text is not as expected."""

    NAME = "asyncua.ua.object_ids"

    def __init__(self) -> None:
        self.real: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.NAME:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None or real.origin is None or not real.origin.endswith(".py"):
            return None
        self.real[fullname] = real
        return importlib.machinery.ModuleSpec(fullname, self, origin=real.origin)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        real = self.real.pop(module.__name__)
        module.__file__ = real.origin
        compact = None if real.origin is None else _compact_class(Path(real.origin), self.NAME)
        if compact is None:  # asyncua's own module, run as it would have been
            if real.loader is None:
                raise ImportError(f"no loader for {self.NAME}")
            module.__spec__ = real
            module.__loader__ = real.loader
            real.loader.exec_module(module)
            return
        module.ObjectIds = compact  # type: ignore[attr-defined]
        module.ObjectIdNames = LazyObjectIdNames()  # type: ignore[attr-defined]


@contextmanager
def object_ids_from_source() -> Iterator[None]:
    """While open, `asyncua.ua.object_ids` (if not imported yet) is made from its source
    text: the compact `ObjectIds` and the lazy `ObjectIdNames`, without running the module.
    Running it makes a code object, a class and a dict of 14,772 entries each (about 5 MB
    together) that the compaction then frees, leaving the heap fragmented."""
    loader = _ObjectIdsLoader()
    sys.meta_path.insert(0, loader)
    try:
        yield
    finally:
        sys.meta_path.remove(loader)


class LazyObjectIdNames(Mapping[int, str]):
    """The names of the standard node ids by id, built from `ObjectIds` when first read."""

    def __init__(self) -> None:
        self._names: dict[int, str] | None = None

    def _table(self) -> dict[int, str]:
        if self._names is None:
            from asyncua.ua import object_ids

            self._names = {value: name for name, value in _standard_ids(object_ids.ObjectIds)}
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
    from asyncua import ua
    from asyncua.ua import object_ids, relative_path

    if isinstance(object_ids.ObjectIdNames, LazyObjectIdNames):
        return
    names = LazyObjectIdNames()
    for module in (ua, object_ids, relative_path):
        module.ObjectIdNames = names  # type: ignore[attr-defined]


# `dataclasses`' makers of generated methods (Python 3.11): each returns the method, which
# `_process_class` puts in the class.
_METHOD_MAKERS = ("_init_fn", "_repr_fn", "_cmp_fn", "_hash_fn")


class LazyMethod:
    """A dataclass method not made yet: `dataclasses`' maker and its arguments. Looked up on
    an instance (`obj.__init__`, `obj == other`, `hash(obj)`), it makes the method and puts it
    in the class that holds the stand-in; looked up on the class it stays itself, and a call
    makes the method and runs it."""

    __slots__ = ("fn", "making")

    def __init__(
        self,
        maker: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        # The maker's call, kept as small as it can be (a few hundred bytes a class).
        self.making: tuple[Callable[..., Any], tuple[Any, ...], tuple[tuple[str, Any], ...]] | None
        self.making = (maker, args, kwargs)
        self.fn: Callable[..., Any] | None = None

    def _made(self) -> Callable[..., Any]:
        # Its own lock, not `_lock`: a thread importing a deferred group holds `_lock`, and
        # making a method imports nothing.
        with _method_lock:
            if self.fn is None:
                if self.making is None:
                    raise RuntimeError("a lazy dataclass method lost its arguments")
                maker, args, kwargs = self.making
                self.fn = maker(*args, **dict(kwargs))
                self.making = None
            return self.fn

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        fn = self._made()
        name = fn.__name__
        for klass in (owner or type(instance)).__mro__:
            if klass.__dict__.get(name) is self:
                fn.__qualname__ = f"{klass.__qualname__}.{name}"
                setattr(klass, name, fn)
                break
        return fn.__get__(instance, owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._made()(*args, **kwargs)


class _NoSignature:
    """Stands for `inspect` in `dataclasses` while the context is open: a class without a
    docstring is documented by its name only (its signature would make its `__init__`)."""

    @staticmethod
    def signature(obj: object) -> Any:
        raise ValueError("not computed for a lazily made dataclass")


def _lazy(maker: Callable[..., Any]) -> Callable[..., LazyMethod]:
    def make(*args: Any, **kwargs: Any) -> LazyMethod:
        return LazyMethod(maker, args, tuple(kwargs.items()))

    return make


@contextmanager
def lazy_dataclass_methods() -> Iterator[None]:
    """Dataclasses made in this context get their generated methods when first used (see
    the module docstring). With a `dataclasses` other than the one this was written for, it
    changes nothing."""
    found = {name: getattr(dataclasses, name, None) for name in _METHOD_MAKERS}
    makers: dict[str, Callable[..., Any]] = {n: m for n, m in found.items() if callable(m)}
    if len(makers) != len(_METHOD_MAKERS) or not hasattr(dataclasses, "inspect"):
        yield
        return
    with _lock:
        real_inspect = dataclasses.inspect
        for name, maker in makers.items():
            setattr(dataclasses, name, _lazy(maker))
        dataclasses.inspect = _NoSignature
    try:
        yield
    finally:
        with _lock:
            for name, maker in makers.items():
                setattr(dataclasses, name, maker)
            dataclasses.inspect = real_inspect
