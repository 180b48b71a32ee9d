"""The plant's nodes kept compact in the OPC UA server's memory.

asyncua keeps every node as a `NodeData` holding a dict of about 15 attributes, each an
`AttributeValue` (with its own callback dict) around a `DataValue` around a `Variant`, and
its references as `ReferenceDescription` objects: about 7 kB per node, 40 MB for the 100 x 32
values of 100 machines and their engineering-unit properties. Most of it repeats: the data
type, access level, value rank, description, browse and display name and engineering unit
of `Shift/OEE` are the same on every machine, and so are the references of sibling nodes to
their parent and to their type.

`compact(aspace, nodeids)` replaces nodes that asyncua has built (by its ordinary calls, so
the nodes are exactly what asyncua makes) with `CompactNode`s: each node keeps its own node
id and, for a variable, its value; every other attribute, and every reference that does not
name the node itself, is one object shared by all nodes where it is equal. About 600 bytes
of Python objects per node remain (value included).

Shared objects are never written: the server is read-only for its clients, and the agent
writes only the values, which stay per node. The nodes are compacted one machine at a time
while the address space is built, so the few hundred kB asyncua's objects take before they
are compacted are reused for the next machine instead of growing the process.

`make_properties_virtual(aspace, nodeids)` then takes the engineering-unit properties out of
the node table, all but one of each kind: asyncua asks the table's source for a node it does
not hold, and `VirtualProperties` makes the property again from its kind's template the first
time a client asks for it (asyncua then keeps it).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from asyncua import ua
from asyncua.server.address_space import AddressSpace
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

_NODE_ID = AttributeIds.NodeId
_VALUE = AttributeIds.Value
_VARIABLE = ua.NodeClass.Variable
_HAS_PROPERTY = ua.NodeId(ObjectIds.HasProperty)  # type: ignore[arg-type]
_HAS_TYPE_DEFINITION = ua.NodeId(ObjectIds.HasTypeDefinition)  # type: ignore[arg-type]


class CompactAttribute:
    """What asyncua's `AttributeValue` holds, in slots. Its `datachange_callbacks` dict is
    made when a subscription first adds to it (most values are never subscribed to)."""

    __slots__ = ("callbacks", "value", "value_callback", "value_setter")

    def __init__(self, value: ua.DataValue | None) -> None:
        self.value = value
        self.value_callback: Callable[..., Any] | None = None
        self.value_setter: Callable[..., Any] | None = None
        self.callbacks: dict[int, Callable[..., Any]] | None = None

    @property
    def datachange_callbacks(self) -> dict[int, Callable[..., Any]]:
        """asyncua's use: `.items()` at every write, `[handle] = callback` to subscribe,
        `.pop(handle)` to stop."""
        if self.callbacks is None:
            return _Callbacks(self)
        return self.callbacks


class _Callbacks(dict[int, Callable[..., Any]]):
    """An attribute's callbacks before it has any: becomes the attribute's own at the first
    one added."""

    __slots__ = ("owner",)

    def __init__(self, owner: CompactAttribute) -> None:
        super().__init__()
        self.owner = owner

    def __setitem__(self, key: int, callback: Callable[..., Any]) -> None:
        self.owner.callbacks = self
        super().__setitem__(key, callback)


class CompactNode(Mapping[Any, CompactAttribute]):
    """What asyncua's `NodeData` holds, in slots; the node is also its own `attributes`:
    its node id (made when first read) and value over a dict shared with equal nodes."""

    __slots__ = ("id_attribute", "nodeid", "references", "shared", "value")
    call = None  # asyncua's method callback: none of these nodes is a method

    def __init__(
        self,
        nodeid: ua.NodeId,
        value: CompactAttribute | None,
        shared: Mapping[Any, CompactAttribute],
        references: list[Any],
    ) -> None:
        self.nodeid = nodeid
        self.value = value
        self.shared = shared
        self.references = references
        self.id_attribute: CompactAttribute | None = None

    @property
    def attributes(self) -> CompactNode:
        return self

    def __getitem__(self, key: Any) -> CompactAttribute:
        if key == _VALUE and self.value is not None:
            return self.value
        if key == _NODE_ID:
            if self.id_attribute is None:
                self.id_attribute = CompactAttribute(
                    ua.DataValue(ua.Variant(self.nodeid, ua.VariantType.NodeId))
                )
            return self.id_attribute
        return self.shared[key]

    def __contains__(self, key: object) -> bool:
        return key == _NODE_ID or (key == _VALUE and self.value is not None) or key in self.shared

    def __iter__(self) -> Iterator[Any]:
        yield _NODE_ID
        if self.value is not None:
            yield _VALUE
        yield from (k for k in self.shared if self.value is None or k != _VALUE)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key: Any, attribute: CompactAttribute) -> None:
        if key == _NODE_ID:
            self.id_attribute = attribute
        elif key == _VALUE and self.value is not None:
            self.value = attribute
        else:  # the node's own from now on; the nodes it shared with keep theirs
            self.shared = {**self.shared, key: attribute}


class Interner:
    """Equal objects made one: what `compact` shares between nodes. Keep one for a whole
    address space and drop it when the space is built."""

    def __init__(self) -> None:
        self._objects: dict[tuple[type, bytes], Any] = {}
        self._dicts: dict[tuple[tuple[Any, int], ...], dict[Any, CompactAttribute]] = {}

    def __call__(self, obj: Any) -> Any:
        key = (type(obj), pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
        return self._objects.setdefault(key, obj)

    def attribute(self, value: ua.DataValue | None, *, timeless: bool = False) -> CompactAttribute:
        """One attribute for equal values (`timeless`: equal but for their timestamps)."""
        same = value
        if timeless and value is not None:
            same = dataclasses.replace(value, SourceTimestamp=None, ServerTimestamp=None)
        key = (CompactAttribute, pickle.dumps(same, pickle.HIGHEST_PROTOCOL))
        found = self._objects.get(key)
        if found is None:
            found = self._objects[key] = CompactAttribute(value)
        return found

    def shared(self, attributes: dict[Any, CompactAttribute]) -> dict[Any, CompactAttribute]:
        key = tuple(sorted((int(k), id(v)) for k, v in attributes.items()))
        return self._dicts.setdefault(key, attributes)

    def reference(self, ref: Any) -> Any:
        """A reference to a node's parent or type is shared whole with equal ones; one to a
        child names the child and stays the node's own. Their names and types are shared."""
        for name in ("ReferenceTypeId", "BrowseName", "DisplayName", "TypeDefinition"):
            setattr(ref, name, self(getattr(ref, name)))
        if ref.IsForward and ref.ReferenceTypeId != _HAS_TYPE_DEFINITION:
            return ref
        return self(ref)


def _parent_place(node: Any) -> int | None:
    """Where a property's reference to its parent (inverse HasProperty) is in its references;
    None when the node is not a property."""
    for place, ref in enumerate(node.references):
        if not ref.IsForward and ref.ReferenceTypeId == _HAS_PROPERTY:
            return place
    return None


def _is_property(node: Any) -> bool:
    return _parent_place(node) is not None


def compact(aspace: AddressSpace, nodeids: Iterable[ua.NodeId], interner: Interner) -> None:
    """Replace the nodes `nodeids` of `aspace` by compact ones (see the module's text).
    A data variable keeps its value apart; a property's value (an engineering unit) never
    changes and is shared, with the timestamps of the first property holding it."""
    for nodeid in nodeids:
        node = aspace[nodeid]
        value: CompactAttribute | None = None
        shared: dict[Any, CompactAttribute] = {}
        nodeclass = aspace.read_attribute_value(nodeid, AttributeIds.NodeClass).Value
        variable = nodeclass is not None and nodeclass.Value == _VARIABLE
        keep_value = variable and not _is_property(node)
        for attr, attval in node.attributes.items():
            if attr == _NODE_ID:
                continue
            if attr == _VALUE and keep_value:
                value = CompactAttribute(attval.value)
                if attval.datachange_callbacks:
                    value.callbacks = dict(attval.datachange_callbacks)
            elif attr == _VALUE:
                shared[attr] = interner.attribute(attval.value, timeless=True)
            else:
                shared[attr] = interner.attribute(attval.value)
        references = [interner.reference(ref) for ref in node.references]
        aspace[nodeid] = CompactNode(  # type: ignore[assignment]
            nodeid, value, interner.shared(shared), references
        )


_PROPERTY_SUFFIX = ".EngineeringUnits"


class VirtualProperties:
    """The standard address space's index with the plant's engineering-unit properties made
    when a client first asks for one (asyncua's shelf-backed node table asks its `source` for
    a node not yet in its cache, and keeps what it gets).

    A value's property differs from its equal on another equipment only by its own node id
    and its reference to its parent, so one built property per kind of value (the first
    one's, kept in the table) is the template of the others; the parent's reference to the
    property (its node id, which browsing shows) stays with the parent. About 200 bytes a
    property are not kept until asked for: 2,200 properties for 100 machines. Only a property
    whose node id is its parent's followed by `.EngineeringUnits` is taken out: its id names
    its parent."""

    def __init__(self, source: Any, nodes: Mapping[Any, Any]) -> None:
        self.source = source
        self.nodes = nodes
        # A parent's shared attributes (one dict for every value of its kind) -> the template
        # property and the place of its reference to its parent.
        self.templates: dict[int, tuple[CompactNode, int]] = {}

    def add_template(self, prop: CompactNode, parent: CompactNode, place: int) -> bool:
        """`prop`, a property of `parent` with its reference to it at `place`, as the template
        for the parents equal to `parent`; False when there is one already."""
        return self.templates.setdefault(id(parent.shared), (prop, place))[0] is prop

    def _found(self, key: str) -> tuple[ua.NodeId, CompactNode, CompactNode, int] | None:
        """The property of node id string `key` if it is one taken out: its node id, its
        parent, its template and the place of the reference to the parent."""
        if not key.endswith(_PROPERTY_SUFFIX) or not key.startswith("ns="):
            return None
        head, sep, identifier = key.partition(";s=")
        if not sep or not head[3:].isdigit():
            return None
        ns = int(head[3:])
        parent = self.nodes.get(ua.NodeId(identifier[: -len(_PROPERTY_SUFFIX)], ns))  # type: ignore[arg-type]
        if not isinstance(parent, CompactNode):
            return None
        template = self.templates.get(id(parent.shared))
        if template is None:
            return None
        nodeid = ua.NodeId(identifier, ns)  # type: ignore[arg-type]
        if not any(ref.IsForward and ref.NodeId == nodeid for ref in parent.references):
            return None  # a property this parent does not have
        return nodeid, parent, *template

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and self._found(key) is not None:
            return True
        return key in self.source

    def __getitem__(self, key: str) -> Any:
        found = self._found(key)
        if found is None:
            return self.source[key]
        nodeid, parent, prop, place = found
        references = list(prop.references)
        references[place] = dataclasses.replace(references[place], NodeId=parent.nodeid)
        return CompactNode(nodeid, None, prop.shared, references)

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def make_properties_virtual(aspace: AddressSpace, nodeids: Iterable[ua.NodeId]) -> int:
    """Takes the compacted engineering-unit properties among `nodeids` out of `aspace`'s node
    table, each to be made again when asked for (`VirtualProperties`), keeping one of each
    kind as the template; returns how many were taken out. Nothing is taken out of a table
    that is not read from a shelf (asyncua's default, a plain dict)."""
    nodes: Any = aspace._nodes
    cache = getattr(nodes, "cache", None)
    source = getattr(nodes, "source", None)
    if cache is None or source is None:
        return 0
    if not isinstance(source, VirtualProperties):
        source = nodes.source = VirtualProperties(source, nodes)
    taken = 0
    for nodeid in nodeids:
        prop = cache.get(nodeid)
        if not isinstance(prop, CompactNode) or (place := _parent_place(prop)) is None:
            continue
        parent = cache.get(prop.references[place].NodeId)
        if not isinstance(parent, CompactNode) or not isinstance(parent.nodeid.Identifier, str):
            continue
        # The id `VirtualProperties` finds the parent by.
        named = f"{parent.nodeid.Identifier}{_PROPERTY_SUFFIX}"
        named_id = ua.NodeId(named, parent.nodeid.NamespaceIndex)  # type: ignore[arg-type]
        if nodeid != named_id or source.add_template(prop, parent, place):
            continue  # not one its id can make again, or the template: it stays
        del cache[nodeid]
        taken += 1
    return taken
