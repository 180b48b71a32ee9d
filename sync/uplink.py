"""The MQTT uplink: publish sealed batches (QoS 1), receive signed acks, drive deletion.

A broker PUBACK only means the broker has the message; a batch leaves the outbox only when
a cloud ack, verified against the cloud's ack keys, names its (epoch, seq) and digest, or when
a verified cloud rejection names them (the cloud will never store that batch) and the owner
of the uplink has durably recorded the loss (`on_rejected`).
Unacked batches are resent after `ack_timeout` (brokers drop queued QoS 1 messages for
slow subscribers), with at most `max_in_flight` unacked batches on the wire. After every
(re)connect all unacked batches go out again, so when the link fails over to another node of
a broker cluster (`BrokerSettings.failover`) the batches the lost node held are resumed on
the node reached; ingest stores a batch once however often it arrives.

The MQTT client is `common.mqtt.MqttLink` (paho's network loop in its own thread); its
callbacks only hand work to the asyncio loop (call_soon_threadsafe), so the outbox is touched
from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import mqtt as mqtt_link
from sync.config_message import config_topic
from sync.envelope import AckBody, AckError, RejectionBody, verify_cloud_message


def batch_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}edge/{site}/{agent}/v1/batches"


def ack_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}edge/{site}/{agent}/v1/acks"


class PendingLike(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def digest(self) -> str: ...
    @property
    def envelope(self) -> bytes: ...
    @property
    def count(self) -> int: ...


class BatchStore(Protocol):
    """What the uplink needs from the outbox."""

    @property
    def epoch(self) -> str: ...
    def pending(
        self, limit: int, *, after_seq: int = 0, skip: Collection[int] = ()
    ) -> Sequence[PendingLike]: ...
    def ack(self, epoch: str, acked: dict[int, str]) -> list[int]: ...
    def tidy(self) -> int:
        """Delete acked batches whose deletion is due (the outbox deletes them together)."""
        ...

    def remove_rejected(self, epoch: str, seq: int, digest: str) -> bool: ...


RejectionHandler = Callable[[RejectionBody, int], bool]
"""(verified rejection, events in the batch) -> whether the loss is durably recorded; only
then does the batch leave the outbox (otherwise it is sent again and refused again)."""


# Where they were defined before common.mqtt took them over (agent and tests import them here).
BrokerSettings = mqtt_link.BrokerSettings
make_client = mqtt_link.make_client


@dataclass
class UplinkStats:
    published: int = 0
    resent: int = 0
    acked_batches: int = 0
    acks_rejected: int = 0
    rejected_batches: int = 0  # refused for good by the cloud, loss recorded, removed
    connected: bool = False


class Uplink:
    """Ships the outbox's batches and applies verified acks; `await uplink.run()`."""

    def __init__(
        self,
        store: BatchStore,
        settings: BrokerSettings,
        *,
        site: str,
        agent: str,
        ack_keys: Mapping[str, Ed25519PublicKey],
        topic_prefix: str = "",
        ack_timeout: float = 15.0,
        max_in_flight: int = 16,
        poll_interval: float = 0.5,
        on_rejected: RejectionHandler | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.site = site
        self.agent = agent
        self.ack_keys = dict(ack_keys)
        self.batch_topic = batch_topic(topic_prefix, site, agent)
        self.ack_topic = ack_topic(topic_prefix, site, agent)
        self.ack_timeout = ack_timeout
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.on_rejected = on_rejected
        self.stats = UplinkStats()
        # Set by the owner before `run` to receive the signed configuration the cloud publishes
        # (retained) on this topic; called on the event loop with the raw payload.
        self.config_topic = config_topic(topic_prefix, site, agent)
        self.on_config: Callable[[bytes], None] | None = None
        self._in_flight: dict[int, float] = {}  # seq -> monotonic time sent
        self._wake = asyncio.Event()
        self._acks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = structlog.get_logger("sync.uplink").bind(agent=agent, site=site)
        self._link = mqtt_link.MqttLink(
            settings,
            settings.client_id or f"edge-{site}-{agent}",
            self._subscriptions,
            on_message=self._on_message,
            on_connection=self._on_connection,
            log=self._log,
        )

    # -- paho thread ------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        """Asked at each connect: the config topic only once an owner takes configurations."""
        return [self.ack_topic] + ([self.config_topic] if self.on_config is not None else [])

    def _on_connection(self, up: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected, up, self._link.address)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._loop is None:
            return
        if topic == self.config_topic and self.on_config is not None:
            self._loop.call_soon_threadsafe(self.on_config, payload)
            return
        self._loop.call_soon_threadsafe(self._enqueue_ack, payload)

    # -- asyncio side ---------------------------------------------------------------------

    def _enqueue_ack(self, payload: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._acks.put_nowait(payload)
        self._wake.set()

    def _connected(self, up: bool, address: tuple[str, int]) -> None:
        if up != self.stats.connected:
            host, port = address
            self._log.info("broker connected" if up else "broker lost", host=host, port=port)
        self.stats.connected = up
        # After a (re)connect nothing is known about what the broker delivered: resend all.
        self._in_flight.clear()
        self._wake.set()

    def notify(self) -> None:
        """New batches were committed: ship them now rather than at the next poll."""
        self._wake.set()

    def apply_ack(self, payload: bytes) -> list[int]:
        """Verify an ack (or rejection) and delete what it names; a bad one deletes nothing."""
        try:
            body = verify_cloud_message(payload, verify_keys=self.ack_keys, agent_id=self.agent)
        except AckError as exc:
            self.stats.acks_rejected += 1
            self._log.warning("ack rejected", reason=exc.reason)
            return []
        if body.epoch != self.store.epoch:
            return []
        if isinstance(body, RejectionBody):
            return self._apply_rejection(body)
        return self._apply_ack(body)

    def _apply_ack(self, body: AckBody) -> list[int]:
        named = {int(seq): digest for seq, digest in body.digests.items() if body.covers(int(seq))}
        deleted = self.store.ack(body.epoch, named)
        for seq in named:
            self._in_flight.pop(seq, None)
        self.stats.acked_batches += len(deleted)
        if deleted:
            self._wake.set()
        return deleted

    def _apply_rejection(self, body: RejectionBody) -> list[int]:
        found = self.store.pending(1, after_seq=body.seq - 1)
        if not found or found[0].seq != body.seq or found[0].digest != body.digest:
            return []  # gone already (a replayed rejection) or never ours: nothing to do
        log = self._log.bind(epoch=body.epoch, seq=body.seq, reason=body.reason)
        if self.on_rejected is None or not self.on_rejected(body, found[0].count):
            # Without a recorded loss the batch stays: it goes out again, is refused again.
            log.error("batch refused by the cloud; its loss cannot be recorded now, kept")
            return []
        if not self.store.remove_rejected(body.epoch, body.seq, body.digest):
            return []
        self._in_flight.pop(body.seq, None)
        self.stats.rejected_batches += 1
        log.error("batch refused by the cloud for good; loss recorded, batch removed")
        self._wake.set()
        return [body.seq]

    def _publish_due(self) -> None:
        if not self.stats.connected:
            return
        now = time.monotonic()
        overdue = [seq for seq, sent in self._in_flight.items() if now - sent > self.ack_timeout]
        for seq in overdue:
            del self._in_flight[seq]  # presumed lost on the way: send again
        if overdue:
            # Each resend means a batch or its ack went missing (or ingest is slower than
            # ack_timeout): worth one line per round, with where to look.
            self.stats.resent += len(overdue)
            self._log.warning(
                "no ack within ack_timeout, sending again",
                batches=len(overdue),
                first_seq=min(overdue),
                ack_timeout=self.ack_timeout,
            )
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            return
        # The oldest unacked batches not in flight: those in flight are not read again.
        for batch in self.store.pending(free, skip=self._in_flight.keys()):
            info = self._link.publish(self.batch_topic, batch.envelope, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self._in_flight[batch.seq] = now
            self.stats.published += 1

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._link.start()
        try:
            while True:
                while not self._acks.empty():
                    self.apply_ack(self._acks.get_nowait())
                self.store.tidy()
                self._publish_due()
                # Nothing can arrive between the drain above and here (no await): an ack,
                # a commit (`notify`) or a (re)connect sets `_wake` from now on. One wait
                # on one event, no task per round: a round runs for every ack and commit.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()
        finally:
            self._link.stop()
