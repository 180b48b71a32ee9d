"""`cloud-api serve` with worker processes: the real command answering through its workers and
stopping cleanly on SIGTERM, and the listening socket they share, on which asyncio turns
Nagle's algorithm off for every connection."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import uvicorn

from cloud_api.auth import TokenKeyring, generate_token_key, issue_token
from cloud_api.cli import tcp_listening_socket
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


def test_serve_with_workers_answers_and_stops_cleanly(pg_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_token_key(keys)
    token, _ = issue_token(
        TokenKeyring.load(keys), SecuritySettings(), subject="serve-test", role="service",
        sites=["*"], ttl=timedelta(minutes=10),
    )  # fmt: skip
    port = free_port()
    env = {"CLOUD_DATABASE_URL": pg_url, "CLOUD_KEYS_DIR": str(keys), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_api.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--workers", "2", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
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
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(children) >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


async def test_workers_accept_on_a_socket_asyncio_turns_nagle_off_for() -> None:
    config = uvicorn.Config("cloud_api.asgi:app", host="127.0.0.1", port=free_port())
    listening = tcp_listening_socket(config)
    assert listening.proto == socket.IPPROTO_TCP
    accepted: asyncio.Queue[int] = asyncio.Queue()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.put_nowait(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Probe, sock=listening)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", config.port)
        assert await accepted.get() != 0  # Nagle off on the accepted connection
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
