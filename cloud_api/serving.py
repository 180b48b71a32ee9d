"""Worker processes for `cloud-api serve --workers N`, each accepting on its own socket.

uvicorn's own worker mode binds one listening socket and shares it: whichever worker's event
loop wakes first accepts every connection waiting in the queue (asyncio accepts up to the
backlog in one go). Keep-alive clients that connect together, such as a dashboard's or a load
balancer's pool, then all land on one worker and stay there: with 32 clients, one worker held
all 32 connections and the other none, and the service ran as if it had one process.

Here each worker binds its own socket to the same address with SO_REUSEPORT, and the kernel
spreads new connections evenly over the workers' sockets. The supervisor first binds the
address without SO_REUSEPORT, so a port that another program or another `cloud-api serve`
listens on is a clear error at start rather than a port silently shared; it then holds the
address with a bound socket that never listens (the kernel gives connections only to
listening sockets), and port 0 picks one port for all workers.

A worker that dies is replaced; a worker that exits with an error within its first seconds
stops the service (a configuration or start-up problem that a restart of the worker would
only repeat), and systemd decides what comes next. Connections still waiting in a dying
worker's accept queue are reset by the kernel (clients retry); the other workers keep
answering.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
import uvicorn

log = structlog.get_logger("cloud_api.serve")

_spawn = multiprocessing.get_context("spawn")
# A worker that exits with an error within this many seconds of its start failed to start.
START_FAILURE_S = 10.0
# Within the unit's TimeoutStopSec (20 s), so stragglers are killed here, not by systemd.
STOP_TIMEOUT_S = 15.0


def worker_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening.

    Created as IPPROTO_TCP: asyncio turns Nagle's algorithm off only on connections accepted
    from a socket that says TCP. uvicorn's own binding uses protocol 0, and every answer then
    waited for the client's delayed ACK (44 ms per request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _worker(config: uvicorn.Config, host: str, port: int) -> None:
    """A worker process: its own socket, one uvicorn server (which handles SIGTERM)."""
    sock = worker_socket(host, port)
    config.configure_logging()
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts `workers` processes serving `config` on one address and keeps them running."""

    def __init__(self, config: uvicorn.Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self._stopping = False
        self._procs: list[tuple[BaseProcess, float]] = []  # (process, monotonic start)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, port: int) -> tuple[BaseProcess, float]:
        proc = _spawn.Process(
            target=_worker, args=(self.config, self.config.host, port), name="cloud-api-worker"
        )
        proc.start()
        return proc, time.monotonic()

    def run(self) -> int:
        if self.config.port:
            # Without SO_REUSEPORT, so that another program listening there, or another
            # `cloud-api serve` (whose workers would otherwise share our port), is an error.
            worker_socket(self.config.host, self.config.port, reuse_port=False).close()
        # Held, never listening: reserves the address for the workers.
        holder = worker_socket(self.config.host, self.config.port)
        port = holder.getsockname()[1]
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            self._procs = [self._start(port) for _ in range(self.workers)]
            log.info("serving", host=self.config.host, port=port, workers=self.workers)
            while not self._stopping:
                time.sleep(0.25)
                for i, (proc, started) in enumerate(self._procs):
                    if proc.is_alive() or self._stopping:
                        continue
                    failed = proc.exitcode is not None and proc.exitcode > 0  # not a signal
                    if failed and time.monotonic() - started < START_FAILURE_S:
                        log.error("worker failed at start; stopping", exit_code=proc.exitcode)
                        self._stopping = True
                        code = 1
                        break
                    if time.monotonic() - started < 1.0:
                        continue  # at most one start a second, should a worker crash at once
                    log.warning("worker ended; starting another", exit_code=proc.exitcode)
                    self._procs[i] = self._start(port)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._terminate()
            holder.close()
        return code

    def _terminate(self) -> None:
        for proc, _ in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes what it is answering
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc, _ in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker did not stop in time; killing it", pid=proc.pid)
                proc.kill()
                proc.join()
