"""The agent as a systemd service: the supervisor around the pipeline.

It owns the service protocol with systemd (READY, WATCHDOG, RELOADING, STOPPING and STATUS
sent as datagrams to `$NOTIFY_SOCKET`), the watchdog that pings only while the pipeline is
alive, the atomic configuration reload on SIGHUP (the new file is loaded and checked in full
before the running pipeline is touched; a bad file is rejected and the running configuration
stays), and the graceful stop on SIGTERM/SIGINT (the runtime commits what it holds with its
checkpoint, closes its connections and drains the uplink for a bounded time).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from agent.config import AgentConfig, ConfigError
from agent.configcheck import load_config_apart
from agent.remote_config import Candidate, RemoteConfig
from common.memory import release_free_memory
from oee.engine import PlantEngine
from sync.keys import AgentKeys, KeyFileError

log = structlog.get_logger("agent.service")

Monotonic = Callable[[], float]


class SdNotifier:
    """sd_notify(3) without libsystemd: one datagram per message to `$NOTIFY_SOCKET`.

    Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op, so the same binary runs in a
    terminal, a container or a test.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        # An address starting with "@" is in Linux's abstract namespace (leading NUL byte).
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; returns whether it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # A receiver that stops reading must never block the event loop: with a full
                # queue the message is dropped (BlockingIOError) instead.
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            # The service keeps running without its supervisor's protocol; say so once.
            if not self._failed:
                log.warning("cannot notify systemd", socket=self.address, error=str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tie READY to this reload.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when systemd set no watchdog."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process of the unit
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class Pipeline(Protocol):
    """What the watchdog looks at in a running `AgentRuntime`."""

    @property
    def tasks(self) -> list[asyncio.Task[None]]: ...
    @property
    def last_flush(self) -> float | None: ...


def pipeline_problem(pipeline: Pipeline | None, now: float, stale_after: float) -> str | None:
    """Why the pipeline is not alive, or None when it is.

    Alive means: every stage task (engine, flush, uplink, each connection) is still running
    and the flush loop ran within `stale_after` seconds (monotonic clock).
    """
    if pipeline is None or not pipeline.tasks:
        return "pipeline not started"
    for task in pipeline.tasks:
        if task.done():
            return f"pipeline stage {task.get_name()!r} stopped"
    if pipeline.last_flush is None:
        return "no flush yet"
    age = now - pipeline.last_flush
    if age > stale_after:
        return f"no flush for {age:.0f} s"
    return None


@dataclass
class ReloadStats:
    """Counters of SIGHUP reloads, exported as metrics."""

    generation: int = 1
    applied: int = 0
    rejected: int = 0
    last_error: str | None = None


class RuntimeLike(Protocol):
    tasks: list[asyncio.Task[None]]
    last_flush: float | None

    async def run(self, stop: asyncio.Event) -> None: ...


RuntimeFactory = Callable[[AgentConfig, AgentKeys], RuntimeLike]


def check_candidate(path: Path) -> tuple[AgentConfig, AgentKeys]:
    """Load and check a new configuration as far as possible without touching the running one.

    Raises ConfigError with a message for the plant engineer.
    """
    config = load_config_apart(path)
    return config, check_config(config, str(path))


def check_config(config: AgentConfig, source: str) -> AgentKeys:
    """The checks of a reload beyond the file itself: its keys load and the OEE engine takes
    it. Returns the keys; raises ConfigError."""
    path = source
    try:
        keys = AgentKeys.load(config.keys_dir)
    except (KeyFileError, OSError) as exc:
        raise ConfigError(f"{path}: keys in {config.keys_dir} are not usable: {exc}") from None
    try:
        PlantEngine(
            config.oee_specs(),
            config.calendar(),
            agent_id=config.agent.id,
            site_id=config.agent.site,
            bucket_seconds=config.agent.bucket_seconds,
        )
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: the OEE engine refuses this configuration: {exc}") from None
    return keys


class AgentService:
    """Runs one `AgentRuntime` at a time; SIGHUP swaps it for one with the new configuration.

    `await service.run()` returns after a stop signal once the pipeline has committed and
    closed; it raises when a pipeline stage fails, so systemd restarts the service.
    """

    def __init__(
        self,
        config_path: Path,
        config: AgentConfig,
        keys: AgentKeys,
        *,
        runtime_factory: RuntimeFactory | None = None,
        notifier: SdNotifier | None = None,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.keys = keys
        self.notifier = notifier or SdNotifier()
        self.monotonic = monotonic
        self.runtime: RuntimeLike | None = None
        self.reloads = ReloadStats()
        self.started_at = monotonic()
        self._factory = runtime_factory or _default_factory
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._watchdog_problem: str | None = None
        self._ready = False  # READY sent once: watchdog pings start after it
        # Pushed configurations (config.source: cloud); the stored version replaces the file.
        self.remote = RemoteConfig(config, keys, check=check_config)
        stored = self.remote.startup()
        if stored is not None:
            self.config, self.keys = stored

    # -- signals --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def dump_tasks(self) -> None:
        """SIGUSR1: log every asyncio task of the agent with the chain of awaits it is
        suspended in, to find what holds up a stop or a stage (`kill -USR1 <pid>`, then read
        the journal)."""
        for task in asyncio.all_tasks():
            # At error level, so a log_level of error still shows what was asked for.
            log.error(
                "task",
                name=task.get_name(),
                done=task.done(),
                cancelling=task.cancelling(),
                waits_at=_await_chain(task.get_coro()),
            )

    @property
    def stale_after(self) -> float:
        """How long the flush loop may stay silent before the pipeline counts as hung."""
        return max(10.0, 5 * self.config.uplink.flush_interval)

    def problem(self) -> str | None:
        return pipeline_problem(self.runtime, self.monotonic(), self.stale_after)

    # -- watchdog -------------------------------------------------------------------------

    def beat(self) -> bool:
        """Ping the watchdog if the pipeline is alive; returns whether a ping was sent."""
        if not self._ready:
            return False  # the first pipeline has not started: no ping before READY
        if self._stop.is_set():
            # Stopping: the stages are being cancelled on purpose, and systemd times a stop
            # with TimeoutStopSec, not the watchdog. Nothing to report.
            return False
        problem = self.problem()
        if problem is None:
            if self._watchdog_problem is not None:
                log.info("pipeline alive again, watchdog pings resume")
                self._watchdog_problem = None
            return self.notifier.watchdog()
        if problem != self._watchdog_problem:
            # Withholding pings lets systemd restart a hung agent after WatchdogSec.
            log.error("pipeline not alive, watchdog pings withheld", problem=problem)
            self.notifier.status(f"pipeline not alive: {problem}")
            self._watchdog_problem = problem
        return False

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.beat()

    # -- reload ---------------------------------------------------------------------------

    def _try_reload(self) -> tuple[AgentConfig, AgentKeys] | None:
        try:
            config, keys = check_candidate(self.config_path)
        except ConfigError as exc:
            self.reloads.rejected += 1
            self.reloads.last_error = str(exc)
            log.error(
                "configuration reload rejected; the running configuration stays",
                problem=str(exc),
            )
            self.notifier.status(f"reload rejected, running generation {self.reloads.generation}")
            return None
        return self.remote.effective(config, keys)

    # -- main loop ------------------------------------------------------------------------

    async def _wait_started(self, runtime: RuntimeLike, task: asyncio.Task[None]) -> None:
        # The runtime publishes its stage tasks once it has resumed and committed; polling
        # keeps AgentRuntime free of service concerns.
        while not runtime.tasks and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_tasks)
        helpers: list[asyncio.Task[None]] = []
        if self.notifier.watchdog_interval:
            helpers.append(
                asyncio.create_task(
                    self._watchdog_loop(self.notifier.watchdog_interval), name="watchdog"
                )
            )
        health = None
        if self.config.health.enabled:
            from agent.health import HealthServer

            health = HealthServer(self, port=self.config.health.port)
            await health.start()
        try:
            await self._supervise(health)
        finally:
            self.notifier.stopping()
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if health is not None:
                await health.stop()
            # SIGUSR1 stays with the loop (until it closes): a stop that hangs after this
            # point can still be asked where it waits, and the signal's default, ending the
            # process, does not come back.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _supervise(self, health: HealthServerLike | None) -> None:
        # A pushed configuration being watched, and the configuration to go back to.
        settling: Candidate | None = None
        last_good: tuple[AgentConfig, AgentKeys] | None = None
        while True:
            runtime = self._factory(self.config, self.keys)
            self.runtime = runtime
            self.remote.attach(runtime)
            run_stop = asyncio.Event()
            task = asyncio.create_task(runtime.run(run_stop), name="pipeline")
            await self._wait_started(runtime, task)
            if not task.done():
                self.notifier.ready(
                    f"running {len(self.config.equipment)} equipment, "
                    f"configuration generation {self.reloads.generation}"
                )
                self._ready = True
            # What parsing the file, building the pipeline and (on a reload) the pipeline
            # before it freed stays resident in the C heap until given back (after READY,
            # which it must not delay).
            release_free_memory()
            candidate: tuple[AgentConfig, AgentKeys] | None = None
            rolling_back = False
            if settling is not None and last_good is not None:
                why = await self.remote.settle(settling, runtime, task, self.problem, self._stop)
                if why is None and not self._stop.is_set():
                    self.remote.applied(settling)
                elif why is not None:
                    # Back to the last good configuration, whose pipeline reports this.
                    self.remote.rolled_back(settling, why)
                    candidate, rolling_back = last_good, True
                    if health is not None:
                        await health.rebind(last_good[0].health)
                settling = last_good = None
            while candidate is None:
                stop = asyncio.create_task(self._stop.wait())
                reload = asyncio.create_task(self._reload.wait())
                pushed = asyncio.create_task(self.remote.wake.wait())
                await asyncio.wait(
                    [task, stop, reload, pushed], return_when=asyncio.FIRST_COMPLETED
                )
                stop.cancel()
                reload.cancel()
                pushed.cancel()
                if task.done() or self._stop.is_set():
                    break
                if self.remote.wake.is_set():
                    remote = self.remote.take()
                    if remote is None:
                        continue
                    if health is not None and not await health.rebind(remote.config.health):
                        self.remote.refuse_candidate(remote, "the new health port cannot be bound")
                        continue
                    self.remote.begin(remote)
                    settling, last_good = remote, (self.config, self.keys)
                    candidate = (remote.config, remote.keys)
                    break
                self._reload.clear()
                candidate = self._try_reload()
                if (
                    candidate is not None
                    and health is not None
                    and not await health.rebind(candidate[0].health)
                ):
                    self.reloads.rejected += 1
                    self.reloads.last_error = "the new health port cannot be bound"
                    candidate = None
            if task.done() and not rolling_back:
                # A stage failed (or the runtime ended on its own): let systemd restart us.
                await task
                raise RuntimeError("the pipeline ended without a stop request")
            if candidate is None:
                self.notifier.stopping()
                run_stop.set()
                await task
                return
            self.notifier.reloading()
            log.info("reloading the configuration", path=str(self.config_path))
            run_stop.set()
            if rolling_back:
                # A pipeline of the pushed configuration that failed in its settle period:
                # its error is the reported reason of the roll-back.
                with contextlib.suppress(Exception):
                    await task
            else:
                await task
            self.config, self.keys = candidate
            self.reloads.generation += 1
            self.reloads.applied += 1
            self.reloads.last_error = None
            log.info("configuration reloaded", generation=self.reloads.generation)


class HealthServerLike(Protocol):
    async def rebind(self, settings: object) -> bool: ...


def _await_chain(coro: object, limit: int = 16) -> list[str]:
    """file:line function of each coroutine (or async generator, as in an async context
    manager) in the chain a suspended coroutine awaits."""
    chain: list[str] = []
    while coro is not None and len(chain) < limit:
        frame = next(
            (f for a in ("cr_frame", "ag_frame", "gi_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = next(
            (c for a in ("cr_await", "ag_await", "gi_yieldfrom") if (c := getattr(coro, a, None))),
            None,
        )
    return chain


def _default_factory(config: AgentConfig, keys: AgentKeys) -> RuntimeLike:
    from agent.runtime import AgentRuntime

    return AgentRuntime(config, keys)
