"""What the plant-floor server keeps out of asyncua (agent/floor/slim.py), each in a fresh
interpreter: the table of node id names, built on first read and the same; the standard node
ids, found in a compact table with the same answers; the modules left
unexecuted until used, with a module and names of its own; dataclass methods made when first
used, answering as dataclasses' own; and the agent's server, which with
clients reading and subscribing loads none of them, and loads each, working, when used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, *args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


NAMES = """
import gc, sys, weakref
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
ids = {k: v for k, v in vars(object_ids.ObjectIds).items() if not k.startswith("_")}
old_ids = weakref.ref(object_ids.ObjectIds)
answers = readers()
held = object_ids.ObjectIdNames
before = sys.getrefcount(held)

import agent.floor.opcua_server  # makes the tables lazy and compact when imported
from agent.floor.slim import LazyObjectIdNames, compact_object_ids, make_names_lazy

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

# The compact ObjectIds, in every module that held the class (which is freed).
compact = ua.ObjectIds
compact_object_ids()  # a second call changes nothing
assert compact is ua.ObjectIds
from asyncua.ua import uatypes, uaprotocol_auto
from asyncua.common import manage_nodes
for module in (object_ids, uatypes, uaprotocol_auto, relative_path, agent.floor.opcua_server):
    assert module.ObjectIds is compact, module
gc.collect()
assert old_ids() is None
assert compact.__name__ == "ObjectIds" and compact.__module__ == "asyncua.ua.object_ids"
assert len(ids) > 10000 and all(getattr(compact, k) == v for k, v in ids.items())
assert all(getattr(compact, k) == v for k, v in ids.items())  # kept after the first lookup
assert dict(compact.standard_ids()) == ids
for missing in ("NoSuchNode", "Doubl", "DoubleX", "_private", "zzz", "AAA"):
    assert not hasattr(compact, missing) and getattr(compact, missing, None) is None
# What asyncua's readers of it answer (a type guessed from a variant, a relative path).
variant = ua.Variant(1.5, ua.VariantType.Double)
assert manage_nodes._guess_datatype(variant) == ua.NodeId(ids["Double"])
units = ua.Variant(ua.EUInformation(), ua.VariantType.ExtensionObject)
assert manage_nodes._guess_datatype(units) == ua.NodeId(ids["EUInformation"])
assert readers() == answers
print("ok")
"""


def test_node_id_names_are_the_same_table_built_on_first_read() -> None:
    assert run(NAMES) == "ok"


# A package of our own: `user` imports names and modules from `heavy` (whose import is
# counted) as asyncua's server imports from its client; `heavy` is deferred.
PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/heavy/__init__.py": (
        "import builtins\n"
        "builtins.heavy_runs = getattr(builtins, 'heavy_runs', 0) + 1\n"
        "from .tools import Tool, make\n"
        "CONSTANT = 42\n"
    ),
    "pkg/heavy/tools.py": (
        "class Tool:\n"
        "    def __init__(self, size):\n"
        "        self.size = size\n"
        "def make(size):\n"
        "    return Tool(size)\n"
    ),
    "pkg/user.py": (
        "from pkg.heavy import Tool, make\n"
        "from pkg.heavy import tools\n"
        "import pkg.heavy.tools as tools_again\n"
        "def build(size):\n"
        "    return Tool(size)\n"
    ),
}

DEFERRED = """
import builtins, sys
from agent.floor.slim import DeferredName, deferred

with deferred(["pkg.heavy", "pkg.missing"]):
    import pkg.user as user
    try:
        import pkg.missing
    except ModuleNotFoundError:
        pass  # a deferred name that does not exist fails as it would have
    else:
        raise AssertionError("pkg.missing imported")
assert getattr(builtins, "heavy_runs", 0) == 0  # not executed
assert "pkg.heavy" not in sys.modules and "pkg.heavy.tools" not in sys.modules
assert type(vars(user)["Tool"]) is DeferredName

case = sys.argv[1]
if case == "call":
    tool = user.build(3)
    assert tool.size == 3
elif case == "isinstance":
    from pkg.heavy.tools import Tool as Real  # a later import gets the real module
    assert not isinstance(object(), user.Tool)
    assert isinstance(Real(1), user.Tool)
elif case == "subclass":
    class Bigger(user.Tool):
        pass
    assert Bigger(5).size == 5 and issubclass(Bigger, user.Tool)
elif case == "attribute":
    assert user.tools.make(4).size == 4  # a placeholder module
elif case == "submodule":
    assert user.tools_again.Tool(2).size == 2
assert builtins.heavy_runs == 1  # executed once, when used
import pkg.heavy, pkg.heavy.tools
# The real objects took the place of every stand-in.
assert user.Tool is pkg.heavy.tools.Tool and user.make is pkg.heavy.tools.make
assert user.tools is pkg.heavy.tools and user.tools_again is pkg.heavy.tools
assert pkg.heavy.CONSTANT == 42 and sys.modules["pkg.heavy"] is pkg.heavy
print("ok")
"""


def test_a_deferred_module_runs_once_when_first_used(tmp_path: Path) -> None:
    for name, text in PACKAGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    for case in ("call", "isinstance", "subclass", "attribute", "submodule"):
        code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]\n" + DEFERRED
        assert run(code, case, cwd=tmp_path) == "ok", case


# The agent's server (agent/floor/outputs.py imports it as the agent does), a secure client in
# another process reading, browsing and subscribing; then what was loaded, and each deferred
# group used.
SERVER = """
import asyncio, json, subprocess, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import agent.service  # what the agent imports whatever its configuration
from agent.config import parse_config
from agent.floor.outputs import PlantFloor
from agent.floor.slim import UNUSED_BY_SERVER, DeferredName
from connectors.opcua.certs import create_certificate
from connectors.sample import Sample
from oee.engine import PlantEngine

tmp, port = Path(sys.argv[1]), int(sys.argv[2])
CONFIG = '''
agent: {id: edge-ua, site: plant-ua, timezone: UTC, bucket_seconds: 1}
shifts: [{name: all-day, start: "00:00", end: "00:00"}]
opcua_server:
  endpoint: opc.tcp://127.0.0.1:%d
  security: [Basic256Sha256_SignAndEncrypt]
  users: [{username: hmi, password: right-password}]
  update_interval: 100ms
equipment:
  - id: press-1
    line: line-1
    ideal_cycle_time: 1s
    signals:
      state: {map: {0: idle, 1: running, 2: fault}}
      total_count: {}
''' % port


def loaded(group):
    return sorted(
        m for m in sys.modules
        if (m == group or m.startswith(group + ".")) and sys.modules[m] is not None
    )


async def main():
    for name, uri in (
        ("server", "urn:factory-edge-gateway:edge-agent:server"), ("client", "urn:test:client")
    ):
        create_certificate(
            tmp / f"{name}.der", tmp / f"{name}.pem", application_uri=uri, hostnames=["127.0.0.1"]
        )
    (tmp / "opcua-server.der").write_bytes((tmp / "server.der").read_bytes())
    (tmp / "opcua-server.pem").write_bytes((tmp / "server.pem").read_bytes())
    config = parse_config(CONFIG, replay=True)
    engine = PlantEngine(
        config.oee_specs(), config.calendar(), agent_id="edge-ua", site_id="plant-ua"
    )
    now = datetime.now(UTC)
    engine.start(now)
    engine.feed(Sample("press-1", "state", 2, now))
    engine.tick(now + timedelta(microseconds=1))  # applies the scan of `now`
    depth = iter(range(10**9))
    floor = PlantFloor(
        engine=engine, agent="edge-ua", site="plant-ua", lines={"press-1": "line-1"},
        connections={"press-1": None}, connection_ids=["plc"], links=lambda: {"plc": True},
        outbox_depth=lambda: next(depth), keys_dir=tmp, state_dir=tmp,
        plant_mqtt=None, opcua_server=config.opcua_server,
    )
    floor.start()
    await asyncio.wait_for(floor.opcua.ready.wait(), 120)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), str(tmp), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(client.communicate(), 120)
    assert client.returncode == 0, out
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["state"] == floor.source.read()["press-1"].values["State"] == "fault", seen
    assert seen["ns"] >= 2, seen
    assert len(seen["changes"]) >= 2 and len(set(seen["changes"])) >= 2, seen
    assert seen["browsed"] == "State", seen

    # What serving loaded: none of the deferred groups; the server holds stand-ins.
    for group in UNUSED_BY_SERVER:
        assert loaded(group) == [], (group, loaded(group))
    from asyncua.server import server as server_module
    assert type(vars(server_module)["XmlExporter"]) is DeferredName
    # asyncua's dataclasses were made with their methods deferred: serving made few of them.
    from asyncua.ua import uaprotocol_auto
    from agent.floor.slim import LazyMethod
    classes = [
        c for c in vars(uaprotocol_auto).values()
        if isinstance(c, type) and "__dataclass_fields__" in vars(c)
    ]
    waiting = [c for c in classes if type(vars(c).get("__init__")) is LazyMethod]
    assert len(classes) > 300 and len(waiting) > 0.8 * len(classes), (len(classes), len(waiting))

    # Each group used works: XML export, a date parsed (dateutil), pub/sub, the client.
    from asyncua import ua
    server = floor.opcua.server
    node = server.get_node(ua.NodeId("press-1.State", floor.opcua.ns))
    await server.export_xml([node], str(tmp / "nodes.xml"))
    assert "press-1.State" in (tmp / "nodes.xml").read_text()
    from asyncua.common.ua_utils import string_to_val
    when = string_to_val("2024-05-01T06:30:00Z", ua.VariantType.DateTime)
    assert (when.year, when.hour, when.minute) == (2024, 6, 30), when
    import asyncua.pubsub.pubsub
    pubsub = await server.get_pubsub()
    assert isinstance(pubsub, asyncua.pubsub.pubsub.PubSub)
    generator = await server.get_event_generator()  # events: asyncua.common.event_objects
    assert isinstance(generator.event, sys.modules["asyncua.common.event_objects"].BaseEvent)
    await generator.trigger(message="plant-floor event")
    from asyncua import Client
    import asyncua.client.client
    assert type(Client("opc.tcp://127.0.0.1:1")) is asyncua.client.client.Client
    assert server_module.Client is asyncua.client.client.Client
    assert server_module.XmlExporter is sys.modules["asyncua.common.xmlexporter"].XmlExporter
    await floor.stop()
    print("ok")


CLIENT = '''
import asyncio, json, sys
from asyncua import ua
from asyncua.client.client import Client

port, tmp = sys.argv[1], sys.argv[2]


class Changes:
    def __init__(self):
        self.values = []
        self.enough = asyncio.Event()

    def datachange_notification(self, node, value, data):
        self.values.append(value)
        if len(set(self.values)) >= 2:
            self.enough.set()


async def main():
    client = Client(f"opc.tcp://127.0.0.1:{port}", timeout=10)
    client.application_uri = "urn:test:client"
    await client.set_security_string(
        f"Basic256Sha256,SignAndEncrypt,{tmp}/client.der,{tmp}/client.pem"
    )
    client.set_user("hmi")
    client.set_password("right-password")
    async with client:
        ns = await client.get_namespace_index("urn:factory-edge-gateway:plant-floor")
        state = await client.get_node(ua.NodeId("press-1.State", ns)).read_value()
        found = await client.nodes.objects.get_child(
            [f"{ns}:Plant", f"{ns}:plant-ua", f"{ns}:line-1", f"{ns}:press-1", f"{ns}:State"]
        )
        browsed = (await found.read_browse_name()).Name
        changes = Changes()
        sub = await client.create_subscription(50, changes)
        depth = client.get_node(ua.NodeId("plant-ua.Agent.OutboxDepth", ns))
        await sub.subscribe_data_change(depth)
        await asyncio.wait_for(changes.enough.wait(), 60)
        await sub.delete()
    print(json.dumps({"ns": ns, "state": state, "browsed": browsed, "changes": changes.values}))


asyncio.run(main())
'''

asyncio.run(main())
"""


LAZY = """
import dataclasses
from dataclasses import InitVar, dataclass, field
from agent.floor.slim import LazyMethod, lazy_dataclass_methods


def define():
    # Dataclasses of every kind of generated method, made anew at each call.
    @dataclass(slots=True)
    class Point:
        x: int
        y: int = 0
        tags: list = field(default_factory=list)

    @dataclass(order=True)
    class Version:
        major: int
        minor: int = 0
        note: str = field(default="", compare=False, repr=False)

    @dataclass(frozen=True)
    class Key:
        a: str
        b: int

    @dataclass(unsafe_hash=True)
    class Tagged:
        name: str

    @dataclass(kw_only=True)
    class Options:
        depth: int
        scale: float = 1.5

    @dataclass
    class Scaled:
        base: int
        factor: InitVar[int] = 2
        result: int = field(init=False, default=0)

        def __post_init__(self, factor):
            self.result = self.base * factor

    @dataclass
    class Child(Scaled):
        extra: str = "x"

    class Custom(Point):
        __slots__ = ()

        def __init__(self, x):
            super().__init__(x, y=x)

    @dataclass
    class Tree:
        label: str
        kids: list = field(default_factory=list)

    return Point, Version, Key, Tagged, Options, Scaled, Child, Custom, Tree


def behaviour(Point, Version, Key, Tagged, Options, Scaled, Child, Custom, Tree):
    tree = Tree("root")
    tree.kids.append(tree)  # a recursive repr
    answers = [
        repr(Point(1)), Point(1, 2) == Point(1, 2), Point(1) == Point(2), Point(1) == (1, 0, []),
        Point(1).tags is not Point(1).tags, Point.__match_args__,
        sorted([Version(2, 1), Version(1, 5), Version(2, 0)]) == [
            Version(1, 5), Version(2, 0), Version(2, 1)
        ],
        Version(1, 0, "a") == Version(1, 0, "b"), repr(Version(1, 0, "hidden")),
        Version(1) < Version(2), Version(3) >= Version(3),
        hash(Key("a", 1)) == hash(Key("a", 1)), Key("a", 1) == Key("a", 1),
        hash(Tagged("n")) == hash(Tagged("n")), Point.__hash__ is None,
        repr(Options(depth=3)), Scaled(4).result, Scaled(4, 3).result, repr(Child(2, 5, "y")),
        Child(2).result, repr(Custom(7)), repr(tree),
        [f.name for f in dataclasses.fields(Version)], dataclasses.asdict(Point(1, 2)),
        dataclasses.replace(Point(1, 2), y=9) == Point(1, 9),
    ]
    for bad in (lambda: Point(), lambda: Options(3), lambda: Key("a", 1).__setattr__("a", "z")):
        try:
            bad()
        except Exception as exc:
            answers.append(type(exc).__name__)
        else:
            answers.append("no error")
    return answers


plain = define()
with lazy_dataclass_methods():
    lazy = define()
after = define()

Point = lazy[0]
generated = ("__init__", "__repr__", "__eq__")
assert all(type(vars(Point)[name]) is LazyMethod for name in generated), vars(Point)
assert type(vars(lazy[1])["__lt__"]) is LazyMethod
assert type(vars(lazy[3])["__hash__"]) is LazyMethod
assert not any(type(v) is LazyMethod for c in after for v in vars(c).values())

# Through the class, before any instance: a call makes the method and runs it.
p = object.__new__(Point)
Point.__init__(p, 5)
assert (p.x, p.y, p.tags) == (5, 0, [])

assert behaviour(*lazy) == behaviour(*plain), (behaviour(*lazy), behaviour(*plain))
# Once used, each method is the plain function, in the class that made it.
for name in generated:
    made = vars(Point)[name]
    assert type(made) is not LazyMethod and callable(made), (name, made)
assert vars(Point)["__init__"].__qualname__ == "define.<locals>.Point.__init__"
assert vars(lazy[7])["__init__"].__qualname__.endswith("Custom.__init__")  # its own stays
print("ok")
"""


def test_lazy_dataclass_methods_behave_as_dataclasses_own() -> None:
    """A dataclass made in `lazy_dataclass_methods` answers as one made without it (init with
    defaults, factories, keyword-only fields, InitVar, slots, inheritance; repr, recursive
    repr; eq, order, hash; errors), and holds the plain methods once they are used."""
    assert run(LAZY) == "ok"


UPB = """
import sys
from pathlib import Path
from google.protobuf.internal import api_implementation
from agent.config import parse_config
from agent.floor.outputs import PlantFloor
from oee.engine import PlantEngine

CONFIG = '''
agent: {id: edge-pb, site: plant-pb, timezone: UTC}
shifts: [{name: all-day, start: "00:00", end: "00:00"}]
plant_mqtt:
  port: 1
  publish: {press-1: all}
equipment:
  - id: press-1
    ideal_cycle_time: 1s
    signals:
      state: {map: {0: idle, 1: running}}
      total_count: {}
'''
PURE = "google.protobuf.internal.python_message"
config = parse_config(CONFIG, replay=True)
engine = PlantEngine(config.oee_specs(), config.calendar(), agent_id="edge-pb", site_id="plant-pb")
floor = PlantFloor(
    engine=engine, agent="edge-pb", site="plant-pb", lines={"press-1": None},
    connections={"press-1": None}, connection_ids=[], links=dict, outbox_depth=lambda: 0,
    keys_dir=Path("."), plant_mqtt=config.plant_mqtt, opcua_server=None,
)
from agent.floor import sparkplug_b_pb2 as pb
node = floor.publisher
death = pb.Payload()
death.ParseFromString(node._ndeath())  # encoded and decoded by upb
assert [m.name for m in death.metrics] == ["bdSeq"], death
rebirth = pb.Payload()
metric = rebirth.metrics.add()
metric.name, metric.datatype, metric.boolean_value = "Node Control/Rebirth", pb.Boolean, True
assert node._on_ncmd(rebirth.SerializeToString()) and node._rebirth.is_set()
if api_implementation.Type() == "upb":
    assert PURE not in sys.modules or type(sys.modules[PURE]).__name__ == "_Placeholder"
    from google.protobuf.internal import python_message  # still there when asked for
    assert hasattr(python_message, "_AttachFieldHelpers")
print("ok")
"""


def test_sparkplug_runs_without_protobufs_pure_python_messages() -> None:
    """With upb's messages, the edge node encodes and decodes its payloads without importing
    protobuf's pure-Python message classes; they import when asked for."""
    assert run(UPB) == "ok"


def test_the_id_table_is_made_from_source_text_of_the_expected_shape(tmp_path: Path) -> None:
    """`ObjectIds` made from a source file: the ids of its class body and none of the lines
    after it; a file not of that shape (too few ids, no class) gives no table, so asyncua's
    own module is run instead."""
    from agent.floor.slim import _compact_class

    names = {f"Name{i}": 3 * i + 1 for i in range(1200)}
    body = "".join(f"    {name} = {value}\n" for name, value in names.items())
    source = tmp_path / "object_ids.py"
    source.write_text(
        "# AUTOGENERATED!!!\n\n\nclass ObjectIds:\n" + body + "\n\nObjectIdNames = {}\n"
        "ObjectIdNames[1] = 'Name0'\n    Later = 99\n"
    )
    table = _compact_class(source, "asyncua.ua.object_ids")
    assert table is not None
    assert all(getattr(table, name) == value for name, value in names.items())
    assert dict(table.standard_ids()) == names  # type: ignore[attr-defined]
    assert getattr(table, "Later", None) is None and getattr(table, "Name1200", None) is None
    source.write_text("class ObjectIds:\n    Null = 0\n")
    assert _compact_class(source, "asyncua.ua.object_ids") is None
    source.write_text("ObjectIds = {}\n")
    assert _compact_class(source, "asyncua.ua.object_ids") is None
    assert _compact_class(tmp_path / "missing.py", "asyncua.ua.object_ids") is None


def test_the_server_serves_without_the_deferred_modules(tmp_path: Path) -> None:
    assert run(SERVER, str(tmp_path), str(free_port())) == "ok"
