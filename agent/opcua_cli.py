"""The OPC UA parts of `edge-agent`: `keys opcua-cert` (a client certificate for secure
connections), `keys opcua-server-cert` (the certificate of the agent's own OPC UA server) and
`simulate opcua` (simulated presses on an asyncua server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from agent import arguments
from agent.config import CONFIG_OPTION_HELP, AgentSection, ConfigError, expand_env

# Not a protocol limit: each press is a few nodes and a task; a bound keeps a typo from
# starting a server with millions of them.
MAX_MACHINES = 10_000


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _read_mapping(path: str) -> dict[str, Any]:
    """The configuration file as plain YAML data, without validating it."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with agent, equipment, ... at the top")
    return data


def _certificate_settings(path: str, connection_id: str | None) -> tuple[str, Path]:
    """The application URI and the keys folder from the configuration file, read without
    the rest of it: `${ENV}` values only `run` needs (passwords) may be unset here."""
    from connectors.opcua.config import OpcUaConnection

    data = _read_mapping(path)
    connections = data.get("connections")
    found = [
        (i, c)
        for i, c in enumerate(connections if isinstance(connections, list) else [])
        if isinstance(c, dict) and c.get("type") == "opcua" and connection_id in (None, c.get("id"))
    ]
    if connection_id is not None and not found:
        raise ConfigError(f"{path}: no OPC UA connection with id {connection_id!r}")
    uri = OpcUaConnection.application_uri
    if found:
        i, conn = found[0]
        uri = expand_env(conn.get("application_uri", uri), f"connections[{i}].application_uri")
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"{path}: application_uri must be a text such as urn:plant:edge-agent")
    keys = _section(data, "keys")
    if keys.get("dir") is not None:
        return uri, Path(expand_env(keys["dir"], "keys.dir"))
    state = _section(data, "agent").get("state_dir", AgentSection.state_dir)
    return uri, Path(expand_env(state, "agent.state_dir")) / "keys"


def cmd_keys_opcua_cert(args: argparse.Namespace) -> int:
    from connectors.opcua.certs import create_certificate
    from connectors.opcua.hub import thumbprint

    uri, keys_dir = _certificate_settings(args.config, args.connection)
    out = Path(args.out) if args.out else keys_dir
    cert_path, key_path = out / "opcua-client.der", out / "opcua-client.pem"
    try:
        cert = create_certificate(
            cert_path,
            key_path,
            application_uri=uri,
            hostnames=args.hostname or None,
            days=args.days,
            overwrite=args.force,
        )
    except FileExistsError as exc:
        print(f"edge-agent: {exc}; keeping it (use --force to replace)")
        return 2
    from cryptography.hazmat.primitives.serialization import Encoding

    print(f"certificate {cert_path} (SHA-1 {thumbprint(cert.public_bytes(Encoding.DER))})")
    print(f"private key {key_path} (mode 0600)")
    print(f"application URI {uri}: trust this certificate on the OPC UA server, then set")
    print(f"  certificate: {cert_path}\n  private_key: {key_path}")
    return 0


def cmd_keys_opcua_server_cert(args: argparse.Namespace) -> int:
    """The certificate of the plant-floor OPC UA server (`opcua_server:`), in the keys
    folder where the server looks for it unless `certificate:` says otherwise."""
    from agent.floor.config import OpcUaServerConfig
    from agent.floor.opcua_server import SERVER_CERT, SERVER_KEY
    from connectors.opcua.certs import create_certificate
    from connectors.opcua.hub import thumbprint

    _, keys_dir = _certificate_settings(args.config, None)
    server = _section(_read_mapping(args.config), "opcua_server")
    uri = OpcUaServerConfig.application_uri
    uri = expand_env(server.get("application_uri", uri), "opcua_server.application_uri")
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"{args.config}: opcua_server.application_uri must be a text")
    out = Path(args.out) if args.out else keys_dir
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    try:
        cert = create_certificate(
            cert_path,
            key_path,
            application_uri=uri,
            common_name="edge-agent plant-floor server",
            hostnames=args.hostname or None,
            days=args.days,
            overwrite=args.force,
        )
    except FileExistsError as exc:
        print(f"edge-agent: {exc}; keeping it (use --force to replace)")
        return 2
    from cryptography.hazmat.primitives.serialization import Encoding

    print(f"certificate {cert_path} (SHA-1 {thumbprint(cert.public_bytes(Encoding.DER))})")
    print(f"private key {key_path} (mode 0600)")
    print(f"application URI {uri}: clients (HMI, SCADA) trust this certificate")
    return 0


def cmd_simulate_opcua(args: argparse.Namespace) -> int:
    from common.logs import configure_logging
    from connectors.opcua.simulator import serve

    configure_logging("warning")

    async def main() -> None:
        stop, restart = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, restart.set)
        presses = await serve(
            args.machines,
            host=args.host,
            port=args.port,
            time_scale=args.time_scale,
            cycle_time=args.cycle_time,
            counter_width=args.counter_width,
            restart_every=args.restart_every,
            stop=stop,
            restart=restart,
            announce=lambda text: print(text, flush=True),
        )
        if args.truth:
            truth = [
                {"machine": i + 1, "produced": p.truth.produced, "scrap": p.truth.scrap}
                for i, p in enumerate(presses)
            ]
            await asyncio.to_thread(Path(args.truth).write_text, json.dumps(truth))

    asyncio.run(main())
    return 0


def add_keys_parser(keys: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = keys.add_parser("opcua-cert", help="create the OPC UA client certificate and key")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("--connection", help="take the application URI from this connection")
    p.add_argument("--out", help="directory (default: the keys directory)")
    p.add_argument("--hostname", action="append", help="host name or IP in the certificate")
    p.add_argument(
        "--days",
        type=arguments.whole_number(1, 36500, "the validity"),
        default=3650,
        help="validity in days (default 3650)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing certificate")
    p.set_defaults(func=cmd_keys_opcua_cert)
    p = keys.add_parser(
        "opcua-server-cert", help="create the certificate of the agent's own OPC UA server"
    )
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("--out", help="directory (default: the keys directory)")
    p.add_argument(
        "--hostname",
        action="append",
        help="host name or IP the HMIs connect to (repeat; default: this host's name)",
    )
    p.add_argument(
        "--days",
        type=arguments.whole_number(1, 36500, "the validity"),
        default=3650,
        help="validity in days (default 3650)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing certificate")
    p.set_defaults(func=cmd_keys_opcua_server_cert)


def add_simulate_parser(sim: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sim.add_parser(
        "opcua",
        help="serve simulated presses over OPC UA",
        description="Serve simulated presses on an asyncua server: objects Press1..PressN with "
        "State, TotalCount, ScrapCount and Reason in namespace "
        "urn:factory-edge-gateway:press-sim. Stops on Ctrl-C or SIGTERM; SIGUSR1 restarts "
        "the server.",
    )
    p.add_argument(
        "--machines",
        type=arguments.whole_number(1, MAX_MACHINES, "the number of machines"),
        default=1,
        help=f"presses to simulate, Press1..PressN (at most {MAX_MACHINES}; default 1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=arguments.port, default=4840, help="TCP port, 1..65535 (default 4840)"
    )
    p.add_argument(
        "--cycle-time",
        type=arguments.cycle_time,
        default=1.0,
        help="seconds per part at full speed, e.g. 2s or 500ms (default 1s; at most 24h)",
    )
    p.add_argument(
        "--time-scale",
        type=arguments.time_scale,
        default=1.0,
        help="scales the duration of each machine state (0.2 = five times faster; default 1)",
    )
    p.add_argument(
        "--counter-width",
        type=int,
        choices=(16, 32, 64),
        default=32,
        help="bits of the part counters (UInt16, UInt32 or UInt64 nodes; they wrap; default 32)",
    )
    p.add_argument(
        "--restart-every",
        type=arguments.duration(0.0, 86400.0, "the restart interval"),
        metavar="DURATION",
        help="restart the server this often, e.g. 30s (also on SIGUSR1); each restart "
        "shifts the namespace index",
    )
    p.add_argument(
        "--truth",
        metavar="FILE",
        help="write what the presses did (parts, scrap) to this JSON file on exit",
    )
    p.set_defaults(func=cmd_simulate_opcua)
