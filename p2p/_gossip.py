"""`Gossip`: gossipsub per swarm topic, started before any connection.

Configured for lamina's traffic rather than py-libp2p's defaults:

* every message is signed and checked (``strict_signing``); a message whose signature or
  sender key is wrong is dropped before any subscriber sees it;
* a size limit (`GOSSIP_MAX_MESSAGE_SIZE`) on publish (`LocalProtocolError`) and on receipt
  (a topic validator rejects bigger messages, so they are not forwarded either);
* the spam limit is per forwarding peer and topic; the default of 10 msg/s is far too low for a
  mesh where one peer relays every origin's announcements;
* only configured topics are accepted from remote peers;
* py-libp2p's subscription queue holds 32 messages and drops the rest with a warning; a pump
  task empties it at once into per-subscriber queues. A full subscriber queue drops (gossip is
  lossy anyway) and counts the drop in `Gossip.dropped`.

Our own messages are not delivered back to us.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from ._constants import (
    GOSSIP_DEGREE,
    GOSSIP_DEGREE_HIGH,
    GOSSIP_DEGREE_LOW,
    GOSSIP_HEARTBEAT_INTERVAL,
    GOSSIP_MAX_MESSAGE_SIZE,
    GOSSIP_MAX_MESSAGES_PER_TOPIC_PER_PEER_PER_SECOND,
    GOSSIP_MAX_RPC_SIZE,
    GOSSIP_SUBSCRIBER_QUEUE,
)
from ._errors import LocalProtocolError

logger = logging.getLogger("lamina.p2p")

__all__ = ["Gossip", "GossipMessage", "GossipSubscription"]


class GossipMessage(NamedTuple):
    """One received gossip message: who published it (signature checked) and its bytes."""

    sender: ID
    data: bytes


class GossipSubscription:
    """Messages of one topic, as an async iterator (or `receive()`); `close()` to stop."""

    def __init__(self, gossip: "Gossip", topic: str) -> None:
        self.topic = topic
        self._gossip = gossip
        self._send, self._receive = trio.open_memory_channel[GossipMessage](GOSSIP_SUBSCRIBER_QUEUE)

    async def receive(self) -> GossipMessage:
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[GossipMessage]:
        return self._receive.__aiter__()

    def close(self) -> None:
        self._gossip._subscribers.get(self.topic, set()).discard(self)
        self._send.close()
        self._receive.close()

    def __enter__(self) -> "GossipSubscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Gossip:
    def __init__(self, libp2p_host, topics: list[str], *, max_message_size: int = GOSSIP_MAX_MESSAGE_SIZE) -> None:  # type: ignore[no-untyped-def]
        self._host = libp2p_host
        self.max_message_size = max_message_size
        self.topics: list[str] = list(dict.fromkeys(topics))
        self.router = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            heartbeat_interval=GOSSIP_HEARTBEAT_INTERVAL,
            spam_protection_enabled=True,
            max_messages_per_topic_per_second=GOSSIP_MAX_MESSAGES_PER_TOPIC_PER_PEER_PER_SECOND,
        )
        # Pubsub registers its connection notifee and stream handlers here, in the constructor:
        # it must exist before the first connection or it never sees that peer.
        self.pubsub = Pubsub(
            libp2p_host,
            self.router,
            strict_signing=True,
            max_inbound_rpc_size=max(GOSSIP_MAX_RPC_SIZE, 2 * max_message_size),
            allowed_topics=frozenset(self.topics),
        )
        self._subscribers: dict[str, set[GossipSubscription]] = {t: set() for t in self.topics}
        self._joined: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self.dropped = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            await self.pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for topic in self.topics:
                    await self._join(topic)
                task_status.started()
                await trio.sleep_forever()

    def _size_ok(self, _peer: ID, msg) -> bool:  # type: ignore[no-untyped-def]
        return len(msg.data) <= self.max_message_size

    async def _join(self, topic: str) -> None:
        if topic in self._joined:
            return
        self.pubsub.set_topic_validator(topic, self._size_ok, False)
        subscription = await self.pubsub.subscribe(topic)
        self._joined.add(topic)
        assert self._nursery is not None
        self._nursery.start_soon(self._pump, topic, subscription)

    async def join(self, topic: str) -> None:
        """Join a topic that was not in the configuration (remote peers' subscriptions to it
        are accepted from now on)."""
        if self._nursery is None:
            raise LocalProtocolError("gossip is not running")
        if topic not in self.topics:
            self.topics.append(topic)
            self._subscribers.setdefault(topic, set())
            self.pubsub.allowed_topics = frozenset(self.topics)
        await self._join(topic)

    async def _pump(self, topic: str, subscription) -> None:  # type: ignore[no-untyped-def]
        me = self._host.get_id()
        while True:
            msg = await subscription.get()
            sender = ID(msg.from_id)
            if sender == me:
                continue
            item = GossipMessage(sender, bytes(msg.data))
            for sub in list(self._subscribers.get(topic, ())):
                try:
                    sub._send.send_nowait(item)
                except trio.WouldBlock:
                    self.dropped += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self._subscribers[topic].discard(sub)

    # -- public API ------------------------------------------------------------------------
    def subscribe(self, topic: str) -> GossipSubscription:
        """A new subscription to a joined topic (configured in `HostConfig.gossip_topics`)."""
        if topic not in self._joined:
            raise LocalProtocolError(f"topic {topic!r} is not joined; add it to HostConfig.gossip_topics")
        sub = GossipSubscription(self, topic)
        self._subscribers[topic].add(sub)
        return sub

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and publish `data` to `topic` (at most `max_message_size` bytes)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError("gossip data must be bytes")
        if len(data) > self.max_message_size:
            raise LocalProtocolError(f"gossip message of {len(data)} bytes exceeds {self.max_message_size}")
        if topic not in self._joined:
            raise LocalProtocolError(f"topic {topic!r} is not joined; add it to HostConfig.gossip_topics")
        await self.pubsub.publish(topic, bytes(data))

    def mesh_peers(self, topic: str) -> list[ID]:
        return list(self.router.mesh.get(topic, ()))

    def topic_peers(self, topic: str) -> list[ID]:
        return list(self.pubsub.peer_topics.get(topic, ()))

    async def wait_for_mesh(self, topic: str, min_peers: int = 1) -> None:
        """Wait until at least `min_peers` peers are in our mesh for `topic` (bound it with
        `trio.fail_after`)."""
        while len(self.router.mesh.get(topic, ())) < min_peers:
            await trio.sleep(0.05)
