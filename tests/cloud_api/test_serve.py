"""`cloud-api serve` with worker processes: the real command answering through its workers,
spreading connections over them, replacing a worker that dies and stopping cleanly on
SIGTERM; and the workers' listening sockets, on which asyncio turns Nagle's algorithm off for
every connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token
from cloud_api.api.serving import worker_socket
from cloud_api.config import SecuritySettings
from tests.conftest import free_port


def _wait_until_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait for the server to answer; the limit only ends a broken run."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cloud-api serve exited"
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("cloud-api serve never answered")


def _argv(port: int) -> list[str]:
    return [sys.executable, "-m", "cloud_api.cli", "serve", "--host", "127.0.0.1", "--port",
            str(port), "--workers", "2", "--log-level", "warning"]  # fmt: skip


def _serve(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`cloud-api serve --workers 2` in its own session, so cleanup can end all of it."""
    return subprocess.Popen(_argv(port), env=env, start_new_session=True)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 60
    while alive := {pid for pid in pids if _alive(pid)}:
        assert time.monotonic() < deadline, f"processes outlived their supervisor: {alive}"
        time.sleep(0.1)


def _children(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return {int(p) for p in found.stdout.split()}


def _sockets(port: int, state: str) -> set[int]:
    """The pids of the processes holding TCP sockets of local `port` in `state`."""
    listing = subprocess.run(
        ["ss", "-tnpH", "state", state, f"( sport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {int(pid) for pid in re.findall(r"pid=(\d+)", listing)}


def _wait_for_listeners(port: int, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(_sockets(port, "listening")) < n:
        assert time.monotonic() < deadline, f"fewer than {n} workers listen on {port}"
        time.sleep(0.1)


def _connection_owners(port: int, n: int) -> set[int]:
    """Open `n` keep-alive connections at once, have each answered, and return the pids of
    the processes that hold their server side."""
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    try:
        for c in clients:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in clients:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        return _sockets(port, "established")
    finally:
        for c in clients:
            c.close()


def test_serve_with_workers_answers_and_stops_cleanly(pg_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_token_key(keys)
    token, _ = issue_token(
        TokenKeyring.load(keys), SecuritySettings(), subject="serve-test", role="service",
        sites=["*"], ttl=timedelta(minutes=10),
    )  # fmt: skip
    port = free_port()
    env = {"CLOUD_DATABASE_URL": pg_url, "CLOUD_KEYS_DIR": str(keys), "PATH": "/usr/bin:/bin"}
    proc = _serve(port, env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, proc)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            # Several connections, so both workers get some; every one answers the same way.
            for _ in range(8):
                with httpx.Client(base_url=base) as fresh:
                    assert fresh.get("/healthz").json() == {"status": "ok"}
            sites = client.get("/v1/sites")
            assert sites.status_code == 200, sites.text
            assert sites.headers["x-content-type-options"] == "nosniff"
        # 64 keep-alive clients connecting together are spread over both workers.
        _wait_for_listeners(port, 2)
        owners = _connection_owners(port, 64)
        children = _children(proc.pid)
        assert len(owners) == 2 and owners <= children, (owners, children)
        # A worker that dies is replaced, and the service answers on.
        victim = min(owners)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in (now := _children(proc.pid)) or len(now) < len(children):
            assert time.monotonic() < deadline, f"no replacement for worker {victim}: {now}"
            time.sleep(0.1)
        _wait_for_listeners(port, 2)
        assert len(_connection_owners(port, 64)) == 2
        running = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _wait_gone(running)
    finally:
        _end_group(proc)


def test_a_second_serve_is_refused_and_workers_end_with_their_supervisor(
    pg_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {"CLOUD_DATABASE_URL": pg_url, "PATH": "/usr/bin:/bin"}
    first = _serve(port, env)
    try:
        # The first supervisor holds the port before it starts workers; a second one is
        # refused whether or not the first one's workers listen yet.
        deadline = time.monotonic() + 60
        while not _children(first.pid):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(
            _argv(port), env=env, capture_output=True, text=True, timeout=60, check=False,
            start_new_session=True,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert "Address already in use" in second.stderr
        _wait_for_listeners(port, 2)
        workers = _sockets(port, "listening")
        # A supervisor killed outright takes its workers with it (no orphan keeps the port).
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        _wait_gone(workers)
    finally:
        _end_group(first)


async def test_workers_accept_on_a_socket_asyncio_turns_nagle_off_for() -> None:
    listening = worker_socket("127.0.0.1", 0)
    assert listening.proto == socket.IPPROTO_TCP
    port = listening.getsockname()[1]
    accepted: asyncio.Queue[int] = asyncio.Queue()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.put_nowait(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Probe, sock=listening)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await accepted.get() != 0  # Nagle off on the accepted connection
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reuse_port", [False, True], ids=["other-program", "other-serve"])
def test_a_port_in_use_is_a_clear_error(pg_url: str, reuse_port: bool) -> None:
    # A listener with SO_REUSEPORT is what the workers of another `cloud-api serve` are.
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_port:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            _argv(port), env={"CLOUD_DATABASE_URL": pg_url, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
    finally:
        taken.close()
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
