"""asyncua's table of node id names, built when first read: the same table, the old one freed,
and what asyncua's readers of it answer unchanged."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from asyncua import ua
from asyncua.common.ua_utils import data_type_to_string
from asyncua.ua import object_ids, relative_path


def readers():
    '''What asyncua's functions that read the table answer.'''
    element = relative_path.RelativePathElement(
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty),
        TargetName=ua.QualifiedName("EngineeringUnits", 0),
    )
    return [
        data_type_to_string(ua.NodeId(ua.ObjectIds.EUInformation)),
        data_type_to_string(ua.NodeId(ua.ObjectIds.Double)),
        relative_path.RelativePathElementFormatter(element).to_string(),
    ]


original = dict(object_ids.ObjectIdNames)
answers = readers()
held = object_ids.ObjectIdNames
before = sys.getrefcount(held)

import agent.floor.opcua_server  # makes the table lazy when imported
from agent.floor.slim import LazyObjectIdNames, make_names_lazy

for module in (ua, object_ids, relative_path):
    assert isinstance(module.ObjectIdNames, LazyObjectIdNames), module
make_names_lazy()  # a second call changes nothing
assert ua.ObjectIdNames is object_ids.ObjectIdNames is relative_path.ObjectIdNames
# Nothing but this probe holds the old table any more: it is freed.
assert sys.getrefcount(held) == before - 3, (before, sys.getrefcount(held))
lazy = ua.ObjectIdNames
assert lazy._names is None  # not built by importing the server
assert readers() == answers, (readers(), answers)
assert dict(lazy) == original and len(lazy) == len(original) > 10000
assert set(lazy.keys()) == set(original)
assert ua.ObjectIds.Double in lazy and -1 not in lazy
print("ok")
"""


def test_node_id_names_are_the_same_table_built_on_first_read() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
