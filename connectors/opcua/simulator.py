"""Simulated presses behind a real asyncua server, for demos, tests and benchmarks.

Each machine N is an object `PressN` in namespace `urn:factory-edge-gateway:press-sim` with
variables State (0 idle, 1 running, 2 fault, 3 setup), TotalCount and ScrapCount (unsigned,
wrapping at the press's counter width) and Reason (1 no material, 2 tool change, 3 jam), with
string node ids `PressN.State`, ... The machines are the same `Press` model the Modbus
simulator serves, so both protocols behave alike. `restart()` stops the server and starts a
new one, optionally registering extra namespaces first so the namespace index changes, as a
real PLC's server may do after a firmware update or reboot.
"""

# asyncua annotates ids and timestamps with NewTypes (ua.String, ua.DateTime, ...) that plain
# str/int/datetime values satisfy at runtime.
# mypy: disable-error-code="arg-type"
from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server

from connectors.modbus.simulator import STATE_CODES, Press

SIM_NAMESPACE = "urn:factory-edge-gateway:press-sim"
VARIABLES = ("State", "TotalCount", "ScrapCount", "Reason")
_COUNTER_TYPES = {16: ua.VariantType.UInt16, 32: ua.VariantType.UInt32, 64: ua.VariantType.UInt64}

SECURITY = {
    ("None", "None"): ua.SecurityPolicyType.NoSecurity,
    ("Basic256Sha256", "Sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Basic256Sha256", "SignAndEncrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Aes128Sha256RsaOaep", "Sign"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ("Aes128Sha256RsaOaep", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt
    ),
    ("Aes256Sha256RsaPss", "Sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ("Aes256Sha256RsaPss", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt
    ),
}


class _Users:
    """Accepts exactly the configured user names and passwords (anonymous when none)."""

    def __init__(self, users: dict[str, str] | None) -> None:
        self.users = users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if self.users is None:
            return User(role=UserRole.User)
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaPressServer:
    """N presses as objects Press1..PressN of one OPC UA server."""

    def __init__(
        self,
        presses: list[Press],
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        security: list[tuple[str, str]] | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: dict[str, str] | None = None,
        clock_offset: float = 0.0,
    ) -> None:
        self.presses = presses
        self.host = host
        self.port = port
        self.security = security or [("None", "None")]
        self.certificate = certificate
        self.private_key = private_key
        self.users = users
        self.clock_offset = timedelta(seconds=clock_offset)
        self.server: Server | None = None
        self.namespace_index = 0
        self.restarts = 0
        self._nodes: list[dict[str, ua.NodeId]] = []
        self._last: list[dict[str, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._tick = 0.1

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    def node_id(self, machine: int, variable: str) -> str:
        """The `ns=..;s=..` id of machine (1-based) variable, valid until the next restart."""
        return f"ns={self.namespace_index};s=Press{machine}.{variable}"

    @staticmethod
    def nsu_id(machine: int, variable: str) -> str:
        """The namespace-URI id of machine variable, valid across restarts."""
        return f"nsu={SIM_NAMESPACE};s=Press{machine}.{variable}"

    async def start(self, *, tick: float = 0.1, extra_namespaces: int = 0) -> None:
        self._tick = tick
        # asyncua logs every session and request at INFO; a simulator should stay quiet.
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        server = Server(user_manager=_Users(self.users))
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}/")
        server.set_server_name("press simulator")
        await server.set_application_uri("urn:factory-edge-gateway:press-sim-server")
        server.set_security_policy([SECURITY[s] for s in self.security])
        if self.certificate is not None and self.private_key is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        for i in range(extra_namespaces):
            await server.register_namespace(f"urn:factory-edge-gateway:filler:{self.restarts}:{i}")
        idx = await server.register_namespace(SIM_NAMESPACE)
        self.namespace_index = idx
        self._nodes = []
        self._last = []
        now = datetime.now(UTC)
        for n, press in enumerate(self.presses, start=1):
            obj = await server.nodes.objects.add_object(
                ua.NodeId(f"Press{n}", idx), ua.QualifiedName(f"Press{n}", idx)
            )
            nodes: dict[str, ua.NodeId] = {}
            last: dict[str, int] = {}
            for name, (value, vtype) in self._values(press).items():
                last[name] = value
                var = await obj.add_variable(
                    ua.NodeId(f"Press{n}.{name}", idx),
                    ua.QualifiedName(name, idx),
                    ua.Variant(value, vtype),
                )
                nodes[name] = var.nodeid
                await server.write_attribute_value(var.nodeid, self._dv(value, vtype, now))
            self._nodes.append(nodes)
            self._last.append(last)
        await server.start()
        self.server = server
        self._task = asyncio.create_task(self._run())

    def _values(self, press: Press) -> dict[str, tuple[int, ua.VariantType]]:
        mask = (1 << press.width) - 1
        ctype = _COUNTER_TYPES[press.width]
        return {
            "State": (STATE_CODES[press.state], ua.VariantType.UInt16),
            "TotalCount": (press.total_raw & mask, ctype),
            "ScrapCount": (press.scrap_raw & mask, ctype),
            "Reason": (press.reason, ua.VariantType.UInt16),
        }

    def _dv(self, value: Any, vtype: ua.VariantType, now: datetime) -> ua.DataValue:
        return ua.DataValue(
            ua.Variant(value, vtype),
            SourceTimestamp=now + self.clock_offset,
            ServerTimestamp=now,
        )

    async def publish(self) -> None:
        """Write every value that changed since the last call."""
        server = self.server
        if server is None:
            return
        now = datetime.now(UTC)
        for press, nodes, last in zip(self.presses, self._nodes, self._last, strict=True):
            for name, (value, vtype) in self._values(press).items():
                if last.get(name) != value:
                    last[name] = value
                    await server.write_attribute_value(nodes[name], self._dv(value, vtype, now))

    async def write_status(self, machine: int, variable: str, status: int) -> None:
        """Give one variable a status code without a value (e.g. BadSensorFailure); it keeps
        it until the machine's value changes."""
        assert self.server is not None
        dv = ua.DataValue(StatusCode=ua.StatusCode(status), SourceTimestamp=datetime.now(UTC))
        await self.server.write_attribute_value(self._nodes[machine - 1][variable], dv)

    async def delete_variable(self, machine: int, variable: str) -> None:
        assert self.server is not None
        nodeid = self._nodes[machine - 1].pop(variable)
        await self.server.delete_nodes([self.server.get_node(nodeid)])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for press in self.presses:
                press.advance(now - last)
            last = now
            await self.publish()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self.server = self.server, None
        if server is not None:
            await server.stop()

    async def restart(self, *, extra_namespaces: int = 1, down_for: float = 0.0) -> None:
        """Stop, wait `down_for` seconds, start again with shifted namespace indexes."""
        await self.stop()
        self.restarts += 1
        await asyncio.sleep(down_for)
        await self.start(tick=self._tick, extra_namespaces=extra_namespaces * self.restarts)


async def serve(
    machines: int,
    *,
    host: str = "127.0.0.1",
    port: int = 4840,
    time_scale: float = 1.0,
    cycle_time: float = 1.0,
    counter_width: int = 32,
    restart_every: float | None = None,
    restart_down_for: float = 2.0,
    stop: asyncio.Event,
    restart: asyncio.Event,
    announce: Any = print,
) -> list[Press]:
    """Serve `machines` presses until `stop` is set; restart when `restart` is set or every
    `restart_every` seconds (each restart shifts the namespace index). Returns the presses."""
    presses = [
        Press(seed=i + 1, time_scale=time_scale, cycle_time=cycle_time, width=counter_width)
        for i in range(machines)
    ]
    sim = OpcUaPressServer(presses, host=host, port=port)
    await sim.start()
    announce(
        f"simulating {machines} press(es) on {sim.url} (namespace {SIM_NAMESPACE} = "
        f"ns={sim.namespace_index}; nodes Press1.State, Press1.TotalCount, ...)"
    )
    loop = asyncio.get_running_loop()
    next_restart = loop.time() + restart_every if restart_every else None
    try:
        while not stop.is_set():
            timeout = 0.5 if next_restart is None else max(0.0, next_restart - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(restart.wait(), timeout=min(timeout, 0.5))
            due = next_restart is not None and loop.time() >= next_restart
            if restart.is_set() or due:
                restart.clear()
                await sim.restart(down_for=restart_down_for)
                announce(f"restarted; namespace index now {sim.namespace_index}")
                if restart_every:
                    next_restart = loop.time() + restart_every
    finally:
        await sim.stop()
    return presses
