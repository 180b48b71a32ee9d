"""`edge-agent`: run the agent, manage its keys and outbox, simulate PLCs, replay history."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import arguments, opcua_cli
from agent.browse import add_parser as browse_parser
from agent.check import add_parser as check_parser
from agent.config import (
    CONFIG_OPTION_HELP,
    AgentConfig,
    ConfigError,
    default_config_path,
    load_config,
)
from agent.status import SUMMARY_ABOVE
from common.logs import configure_logging
from sync.keys import (
    AgentKeys,
    KeyFileError,
    generate_agent_signing_key,
    install_cloud_public_keys,
    retired_signing_keys,
    rotate_agent_signing_key,
)
from sync.version import VERSION

if TYPE_CHECKING:
    from agent.service import AgentService


def _fail(message: str, code: int = 2) -> int:
    print(f"edge-agent: {message}", file=sys.stderr)
    return code


def _config(path: str) -> AgentConfig:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.configcheck import load_config_apart
    from agent.service import AgentService
    from agent.statelock import StateFolderBusy, lock_state_folder

    config = load_config_apart(args.config)  # validated apart: no pydantic in this process
    configure_logging(config.agent.log_level)
    os.umask(0o077)  # outbox, WAL and key files are readable by the agent's user only
    try:
        # Held until the process ends (the kernel releases it even after kill -9).
        lock = lock_state_folder(config.agent.state_dir)
    except StateFolderBusy as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot lock the state folder {config.agent.state_dir}: {exc}")
    try:
        keys = AgentKeys.load(config.keys_dir)
        keys.cloud_key_for(config.uplink.suite)  # the configured suite needs its cloud key
    except (KeyFileError, OSError) as exc:
        return _fail(
            f"keys in {config.keys_dir} are not usable: {exc}\n"
            "  run `edge-agent keys init -c FILE` and install the cloud's public keys "
            "with `edge-agent keys install-cloud -c FILE CLOUD_KEYS_FILE`"
        )

    # SIGTERM/SIGINT stop gracefully, SIGHUP reloads the file; systemd is told via sd_notify.
    service = AgentService(Path(args.config), config, keys)
    try:
        asyncio.run(_run(service))
    finally:
        lock.release()
    return 0


async def _run(service: AgentService) -> None:
    from agent.runtime import cancel_and_wait

    await service.run()
    # asyncio.run would wait without limit for a task that does not end when cancelled. What
    # was sampled is committed by now, so such a task is named and the process exits anyway.
    me = asyncio.current_task()
    stuck = await cancel_and_wait([task for task in asyncio.all_tasks() if task is not me])
    if stuck:
        structlog.get_logger("agent").error(
            "tasks did not end after the stop; exiting without them",
            tasks=[task.get_name() for task in stuck],
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from agent.status import AgentUnreachable, Rates, as_json, fetch, parse_metrics, render

    config = _config(args.config)
    if not config.health.enabled:
        return _fail(f"{args.config}: health.enabled is false; there is nothing to ask")
    try:
        first = fetch(config.health.port)
        if args.prometheus:
            print(first)
            return 0
        # Rates come from two readings a moment apart, measured here: the agent's own
        # per-second gauge needs a scrape a few seconds earlier, which nothing may have done.
        started = time.monotonic()
        time.sleep(args.window)
        text = fetch(config.health.port)
        elapsed = time.monotonic() - started
    except AgentUnreachable as exc:
        return _fail(f"{exc}\n  is the agent running? (systemctl status edge-agent)", 1)
    before, after = parse_metrics(first), parse_metrics(text)
    rates = Rates.between(before, after, elapsed)
    if args.json:
        print(json.dumps(as_json(after, rates)))
    else:
        print(render(after, rates, all_equipment=args.all))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _config(args.config)
    print(
        f"{args.config}: ok ({len(config.equipment)} equipment, "
        f"{len(config.connections)} connection(s), {len(config.shifts)} shift(s))"
    )
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    config = _config(args.config)
    directory = config.keys_dir
    if (directory / "signing.key").exists() and not args.force:
        print(
            f"{directory / 'signing.key'} exists; keeping it (use --force to replace)",
            file=sys.stderr,
        )
    else:
        os.umask(0o077)
        generate_agent_signing_key(directory, overwrite=args.force)
    print((directory / "signing.pub").read_text(encoding="utf-8").strip())
    return 0


def cmd_keys_install_cloud(args: argparse.Namespace) -> int:
    config = _config(args.config)
    lines = [ln.strip() for ln in Path(args.file).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    hpke = [ln for ln in lines if not ln.startswith("ed25519:")]
    acks = [ln for ln in lines if ln.startswith("ed25519:")]
    if not hpke or not acks:
        return _fail(
            f"{args.file}: expected HPKE public key line(s) (one per suite) and at least one "
            "ed25519 ack key line (the output of `cloud-api keys export`)"
        )
    try:
        install_cloud_public_keys(config.keys_dir, hpke, acks)
    except KeyFileError as exc:
        return _fail(f"{args.file}: {exc}")
    print(f"installed the cloud's public keys in {config.keys_dir}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    config = _config(args.config)
    os.umask(0o077)
    try:
        new, old_kid = rotate_agent_signing_key(config.keys_dir)
    except KeyFileError as exc:
        return _fail(str(exc))
    from sync.keys import ed25519_key_id, ed25519_line

    print(ed25519_line(new.public_key()))
    print(
        f"# new signing key {ed25519_key_id(new.public_key())}; retired {old_kid}.\n"
        "# 1. enroll the line above: cloud-api agents enroll --agent ID --site SITE "
        "--public-key FILE\n"
        "# 2. restart the agent (batches signed by an unenrolled key are refused and resent)\n"
        f"# 3. when `edge-agent keys status` shows no batch signed by {old_kid}, revoke it:\n"
        f"#    cloud-api agents revoke-key --agent ID --key-id {old_kid}",
        file=sys.stderr,
    )
    return 0


def _outbox_report(config: AgentConfig, route: str) -> dict[str, Any]:
    """What `route` of the health port reports (see agent/outbox_report.py): asked of the
    running agent when it holds the state folder, read from the file otherwise. Raises
    AgentNotAnswering."""
    import sqlite3

    from agent.outbox_report import ask_agent, keys_report, stats_report
    from agent.statelock import is_held
    from buffer.outbox import Outbox

    if is_held(config.agent.state_dir):
        return ask_agent(config, route)
    try:
        outbox = Outbox(
            config.outbox_path,
            max_bytes=config.outbox.max_bytes,
            min_free_bytes=config.outbox.min_free_bytes,
        )
    except sqlite3.OperationalError:
        if is_held(config.agent.state_dir):  # an agent started in between and holds the file
            return ask_agent(config, route)
        raise
    try:
        if route == "/outbox":
            return stats_report(outbox, config)
        return dict(keys_report(outbox))
    finally:
        outbox.close()


def cmd_keys_status(args: argparse.Namespace) -> int:
    from agent.outbox_report import AgentNotAnswering

    config = _config(args.config)
    keys = AgentKeys.load(config.keys_dir)
    try:
        unacked = _outbox_report(config, "/outbox/keys")
    except AgentNotAnswering as exc:
        return _fail(str(exc), 1)
    data = {
        "signing_key_id": keys.signing_key_id,
        "retired_signing_key_ids": sorted(retired_signing_keys(config.keys_dir)),
        "cloud_hpke_keys": {k.suite: k.key_id for k in keys.cloud_publics},
        "sealing_suite": config.uplink.suite,
        "cloud_ack_key_ids": sorted(keys.ack_verify_keys),
        "unacked_batches_by_signing_key": unacked["unacked_batches_by_signing_key"],
        "unacked_batches_by_cloud_key": unacked["unacked_batches_by_cloud_key"],
    }
    print(json.dumps(data, indent=None if args.json else 2))
    return 0


def cmd_buffer_stats(args: argparse.Namespace) -> int:
    from agent.outbox_report import AgentNotAnswering

    config = _config(args.config)
    if not config.outbox_path.exists():
        return _fail(
            f"no outbox at {config.outbox_path} yet (the agent has not run with this "
            "configuration)",
            1,
        )
    try:
        data = _outbox_report(config, "/outbox")
    except AgentNotAnswering as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json.dumps(data))
        return 0
    from agent import readable
    from agent.status import table

    oldest = data["oldest_unacked_age_s"]
    depth = int(data["depth_batches"])
    rows = [
        ["file", f"{config.outbox_path} (epoch {data['epoch']})"],
        [
            "waiting to be acked",
            f"{readable.count(depth)} batches, {readable.count(data['events'])} events, "
            f"{readable.size(data['bytes'])}",
        ],
        [
            "oldest unacked",
            readable.age(oldest, none="none (all acked)") if depth else "none (all acked)",
        ],
        [
            "room",
            f"{readable.percent(data['fill'])} of {readable.size(data['capacity_bytes'])} "
            f"used ({data['fill_level']}); when full: {config.outbox.when_full}",
        ],
        ["quota", readable.size(data["quota_bytes"])],
        [
            "disk free",
            f"{readable.size(data['disk_free_bytes'])} "
            f"(the outbox leaves {readable.size(data['min_free_bytes'])} free)",
        ],
        [
            "acked",
            f"{readable.count(data['acked_batches_total'])} batches in all, up to seq "
            f"{data['acked_seq_high_water']}; next seq {data['next_seq']}",
        ],
        [
            "raw samples shed",
            f"{readable.count(data['shed_batches_total'])} batches "
            f"({readable.count(data['shed_events_total'])} events); "
            f"{readable.count(data['sheddable_batches'])} could be shed now",
        ],
    ]
    print(table("Outbox", None, rows))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from connectors.modbus.simulator import Press, PressLine

    configure_logging("warning")

    async def main() -> None:
        presses = [
            Press(seed=i + 1, time_scale=args.time_scale, cycle_time=args.cycle_time)
            for i in range(args.machines)
        ]
        line = PressLine(presses, host=args.host, port=args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await line.start()
        print(
            f"simulating {args.machines} press(es) on modbus://{args.host}:{args.port} "
            f"(units 1..{args.machines})",
            flush=True,
        )
        await stop.wait()
        await line.stop()
        if args.truth:
            truth = [
                {
                    "unit": i + 1,
                    "produced": p.truth.produced,
                    "scrap": p.truth.scrap,
                    "seconds": p.truth.seconds,
                }
                for i, p in enumerate(presses)
            ]
            await asyncio.to_thread(
                Path(args.truth).write_text, json.dumps(truth), encoding="utf-8"
            )

    asyncio.run(main())
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from agent.replay import run_replay

    return run_replay(args)


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds within [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} seconds")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the running agent's health and metrics as tables")
    p.add_argument("-c", "--config", help=f"{CONFIG_OPTION_HELP}; for the health port")
    p.add_argument("--prometheus", action="store_true", help="print the raw /metrics text")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument(
        "--all",
        action="store_true",
        help=f"list every machine (above {SUMMARY_ABOVE}, only those not running are listed)",
    )
    p.add_argument(
        "--window",
        type=_seconds(0.1, 60),
        default=1.0,
        help="seconds between the two readings rates are measured over (default: 1)",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("validate", help="check a configuration file and exit")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.set_defaults(func=cmd_validate)
    check_parser(sub)
    browse_parser(sub)

    p = sub.add_parser("replay", help="run the OEE engine on recorded samples (JSON Lines)")
    p.add_argument("-c", "--config", help=f"{CONFIG_OPTION_HELP}; the same as for `run`")
    p.add_argument("--samples", required=True, help="JSON Lines file of samples")
    p.add_argument("--from", dest="from_", required=True, help="window start, ISO 8601")
    p.add_argument("--to", required=True, help="window end (exclusive), ISO 8601")
    p.add_argument("--equipment", help="only this equipment")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_replay)

    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys", required=True)
    p = keys.add_parser("init", help="create the agent's signing key; prints its public key")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keys_init)
    p = keys.add_parser("install-cloud", help="install the cloud's public keys")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("file", help="output of `cloud-api keys export`")
    p.set_defaults(func=cmd_keys_install_cloud)
    p = keys.add_parser(
        "rotate", help="replace the signing key; prints the new public key to enroll"
    )
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.set_defaults(func=cmd_keys_rotate)
    p = keys.add_parser("status", help="key ids in use and unacked batches per key")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.set_defaults(func=cmd_keys_status)
    opcua_cli.add_keys_parser(keys)

    buf = sub.add_parser("buffer", help="outbox").add_subparsers(dest="buffer", required=True)
    p = buf.add_parser("stats", help="depth, bytes, oldest unacked age, acked high-water mark")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object, sizes in bytes (for scripts)"
    )
    p.set_defaults(func=cmd_buffer_stats)

    sim = sub.add_parser("simulate", help="simulated PLCs").add_subparsers(
        dest="sim", required=True
    )
    p = sim.add_parser(
        "modbus",
        help="serve simulated presses over Modbus TCP",
        description="Serve simulated presses over Modbus TCP as units 1..N of one server "
        "(holding registers: 0 state, 1-2 total count, 3-4 scrap count, 5 reason code; "
        "see configs/demo-agent.yaml). Stops on Ctrl-C or SIGTERM.",
    )
    p.add_argument(
        "--machines",
        type=arguments.whole_number(1, arguments.MAX_UNIT_ID, "the number of machines"),
        default=1,
        help="presses to simulate, served as unit ids 1..N "
        f"(at most {arguments.MAX_UNIT_ID}, the highest Modbus unit id; default 1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=arguments.port, default=5020, help="TCP port, 1..65535 (default 5020)"
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
        "--truth",
        metavar="FILE",
        help="write what the presses did (parts, scrap, seconds per state) to this JSON file "
        "on exit",
    )
    p.set_defaults(func=cmd_simulate)
    opcua_cli.add_simulate_parser(sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = None
    # `browse` reads a file only when given one; every other command needs the agent's file.
    if getattr(args, "config", "") is None and args.command != "browse":
        path, chosen = default_config_path()
        args.config = str(path)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        if chosen is not None and not Path(args.config).exists():
            return _fail(
                f"no configuration file at {args.config} ({chosen}); "
                "give one with -c FILE or set EDGE_AGENT_CONFIG"
            )
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
