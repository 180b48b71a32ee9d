"""Worker processes for `cloud-api serve --workers N`, each accepting on its own socket.

uvicorn's own worker mode binds one listening socket and shares it: whichever worker's event
loop wakes first accepts every connection waiting in the queue (asyncio accepts up to the
backlog in one go). Keep-alive clients that connect together, such as a dashboard's or a load
balancer's pool, then all land on one worker and stay there: with 32 clients, one worker held
all 32 connections and the other none, and the service ran as if it had one process.

Here each worker binds its own socket to the same address with SO_REUSEPORT, and the kernel
spreads new connections evenly over the workers' sockets. The supervisor first binds the
address without SO_REUSEPORT, so a port that another program or another `cloud-api serve`
listens on is a clear error at start rather than a port silently shared. It then holds the
address with a bound socket that never listens (the kernel gives connections only to
listening sockets) and that has no SO_REUSEADDR, so another supervisor's check fails on it
even while none of our workers listens; port 0 picks one port for all workers.

A worker that exits with an error while the service starts stops the service (a
configuration or start-up problem that restarts would only repeat; systemd decides what
comes next). Later, a worker that dies is replaced, after a pause that doubles while
replacements keep dying (1 s up to 30 s). Connections still waiting in a dying worker's
accept queue are reset by the kernel (clients retry); the other workers keep answering. A
worker ends when its supervisor does, even if the supervisor is killed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
import uvicorn

log = structlog.get_logger("cloud_api.serve")

_spawn = multiprocessing.get_context("spawn")
# A worker exiting with an error within this many seconds of the service's start: start-up
# failed.
START_FAILURE_S = 10.0
# Pause before replacing a worker that died, doubled per quick death (up to the maximum).
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
# A worker that ran this long before dying is replaced after the shortest pause again.
STABLE_S = 60.0
# Within the unit's TimeoutStopSec (20 s), so stragglers are killed here, not by systemd.
STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


def worker_socket(
    host: str, port: int, *, reuse_port: bool = True, reuse_addr: bool = True
) -> socket.socket:
    """A TCP socket bound to (host, port), with SO_REUSEPORT unless told, not listening.

    Created as IPPROTO_TCP: asyncio turns Nagle's algorithm off only on connections accepted
    from a socket that says TCP. uvicorn's own binding uses protocol 0, and every answer then
    waited for the client's delayed ACK (44 ms per request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _end_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(config: uvicorn.Config, port: int, parent: int) -> None:
    """A worker process: its own socket, one uvicorn server (which handles SIGTERM)."""
    _end_with_parent(parent)
    sock = worker_socket(config.host, port)
    config.configure_logging()
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class _Slot:
    proc: BaseProcess
    started: float  # monotonic
    delay: float = RESTART_DELAY_S
    restart_at: float | None = None


class Supervisor:
    """Starts `workers` processes serving `config` on one address and keeps them running.

    `bind()` claims the address (OSError when it is taken); `run()` serves until SIGTERM or
    SIGINT and returns the exit code.
    """

    def __init__(self, config: uvicorn.Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self._stopping = False
        self._slots: list[_Slot] = []
        self._holder: socket.socket | None = None
        self._port = config.port

    def bind(self) -> None:
        host = self.config.host
        if self._port:
            # Without SO_REUSEPORT: another program listening there, or another
            # `cloud-api serve` (its listeners or its holder), makes this fail.
            worker_socket(host, self._port, reuse_port=False).close()
        # Held, never listening; without SO_REUSEADDR, so the check above fails on it.
        self._holder = worker_socket(host, self._port, reuse_addr=False)
        self._port = self._holder.getsockname()[1]

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _spawn_worker(self) -> BaseProcess:
        proc = _spawn.Process(
            target=_worker,
            args=(self.config, self._port, os.getpid()),
            name="cloud-api-worker",
        )
        proc.start()
        return proc

    def run(self) -> int:
        if self._holder is None:
            self.bind()
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        begun = time.monotonic()
        code = 0
        try:
            self._slots = [_Slot(self._spawn_worker(), begun) for _ in range(self.workers)]
            log.info("serving", host=self.config.host, port=self._port, workers=self.workers)
            while not self._stopping and code == 0:
                time.sleep(0.25)
                code = self._tend(begun)
            self._terminate()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._holder is not None:
                self._holder.close()
        return code

    def _tend(self, begun: float) -> int:
        """Replace workers that died; 1 when start-up failed."""
        now = time.monotonic()
        for slot in self._slots:
            if self._stopping:
                return 0
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    slot.proc, slot.started, slot.restart_at = self._spawn_worker(), now, None
                continue
            if slot.proc.is_alive():
                continue
            exit_code = slot.proc.exitcode
            if exit_code is not None and exit_code > 0 and now - begun < START_FAILURE_S:
                log.error("worker failed at start; stopping", exit_code=exit_code)
                return 1
            if now - slot.started >= STABLE_S:
                slot.delay = RESTART_DELAY_S
            slot.restart_at = now + slot.delay
            log.warning("worker ended; replacing it", exit_code=exit_code, after_s=slot.delay)
            slot.delay = min(RESTART_DELAY_MAX_S, slot.delay * 2)
        return 0

    def _terminate(self) -> None:
        procs = [s.proc for s in self._slots]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes what it is answering
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker did not stop in time; killing it", pid=proc.pid)
                proc.kill()
                proc.join()
