"""py-libp2p 0.8.1 as lamina runs it: the host's construction, and the adaptations its gaps
need (each takes the py-libp2p host or a callback, never our `Host`).

* `new_libp2p_host`: TCP + Noise + yamux only (the defaults also offer plaintext, secio, TLS
  and mplex), one connection per peer, no auto-dialling, mDNS or UPnP;
* `isolate_libp2p_handlers`: py-libp2p's own stream handlers wrapped, so one raising on a
  peer's garbage resets that stream instead of killing the host;
* `reap_inbound_handlers`: the listener task of an inbound connection ends with its socket
  (py-libp2p keeps one per connection ever accepted until the swarm stops);
* `Notifee`: connection events handed on without blocking the swarm;
* `close_connections`: every connection closed at once (py-libp2p closes them one by one);
* `unsupported`: py-libp2p's way of saying a peer does not serve a protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.network.config import RetryConfig
from libp2p.abc import INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from . import _pnet
from ._constants import DIAL_DEADLINE, RESET_DEADLINE
from ._pnet import SwarmKey

logger = logging.getLogger("lamina.p2p")

__all__ = ["new_libp2p_host", "isolate_libp2p_handlers", "reap_inbound_handlers", "Notifee", "close_connections",
           "unsupported"]

AddrsFactory = Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]]


def new_libp2p_host(key_pair: KeyPair, listen_addrs: list[str], addrs_factory: AddrsFactory,
                    swarm_key: SwarmKey | None = None) -> Any:
    """A py-libp2p host (not started) with lamina's stack; `addrs_factory` says which addresses
    it announces; with a `swarm_key`, every connection is protected by it (see `_pnet`)."""
    if swarm_key is not None:
        _pnet.install()  # py-libp2p's own protector speaks no other implementation's pnet
    host = new_host(
        key_pair=key_pair,
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen_addrs],
        # Noise only: new_host's default also offers TLS, secio and plaintext.
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        # yamux only: the default falls back to mplex.
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,  # more makes every dial wait ~250 ms for a second one
            min_connections=0,  # no auto-dialling of every peer in the peerstore
            low_watermark=0,
            dial_timeout=DIAL_DEADLINE,
        ),
        addrs_factory=addrs_factory,
        # identify's observed addresses of TCP dialers are ephemeral ports: never advertise them
        disable_identify_address_discovery=True,
        enable_mDNS=False,
        enable_upnp=False,
        psk=swarm_key.hex if swarm_key is not None else None,
    )
    # One attempt per dial: py-libp2p retries a failed dial 3 times with backoff (0.1, 0.2,
    # 0.4 s plus jitter), so a peer that refuses (its process died) took 0.9 s to fail, and the
    # client's check of whether a broken link's node is alive stalled every SIGKILL failover by
    # that much. Refused means nobody listens; a lost SYN is TCP's own to retransmit; and the
    # callers here decide themselves what to try again, under their own deadlines.
    host.get_network().retry_config = RetryConfig(max_retries=0)
    return host


class Notifee(INotifee):
    """Hands connection events to `on_event(conn, connected=...)`, which must not block: py-libp2p
    awaits notifees inline on its connection path."""

    def __init__(self, on_event: Callable[..., None]) -> None:
        self._on_event = on_event

    async def connected(self, network, conn) -> None:  # type: ignore[no-untyped-def]
        self._on_event(conn, connected=True)

    async def disconnected(self, network, conn) -> None:  # type: ignore[no-untyped-def]
        self._on_event(conn, connected=False)

    async def opened_stream(self, network, stream) -> None:  # type: ignore[no-untyped-def]
        return None

    async def closed_stream(self, network, stream) -> None:  # type: ignore[no-untyped-def]
        return None

    async def listen(self, network, multiaddr) -> None:  # type: ignore[no-untyped-def]
        return None

    async def listen_close(self, network, multiaddr) -> None:  # type: ignore[no-untyped-def]
        return None


def unsupported(exc: BaseException) -> bool:
    """py-libp2p's way of saying the peer does not serve a protocol."""
    return "not supported" in str(exc) or "not supported" in str(exc.__cause__)


class ClosingTCPStream(TrioTCPStream):
    """A TCP stream that says when it has been closed."""

    def __init__(self, stream: trio.SocketStream, closed: trio.Event) -> None:
        super().__init__(stream)
        self._closed_event = closed

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._closed_event.set()


def isolate_libp2p_handlers(h: Any) -> None:
    """Wrap py-libp2p's own stream handlers (identify, ping, Kademlia, gossipsub, ...) so that
    one of them raising on a peer's garbage resets that stream instead of killing the host."""
    handlers = h.get_mux().handlers
    for protocol, handler in list(handlers.items()):
        if handler is None or getattr(handler, "_lamina_isolated", False):
            continue

        async def isolated(stream: Any, _handler: Any = handler, _protocol: Any = protocol) -> None:
            try:
                await _handler(stream)
            except Exception as exc:
                logger.debug("py-libp2p handler for %s failed: %r", _protocol, exc)
                with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
                    try:
                        await stream.reset()
                    except Exception:
                        pass

        isolated._lamina_isolated = True  # type: ignore[attr-defined]
        handlers[protocol] = isolated


def reap_inbound_handlers(h: Any) -> None:
    """py-libp2p keeps the listener task of every inbound connection alive until the swarm
    stops ("intentional barrier"), so a long-running node leaks a task per connection ever
    accepted. Wrap each TCP listener's handler so that task ends when its socket is closed."""
    for listener in h.get_network().listeners.values():
        handler = getattr(listener, "handler", None)
        if handler is None or getattr(handler, "_lamina_reaping", False):
            continue

        async def reaping(stream: Any, _handler: Any = handler) -> None:
            if not isinstance(stream, TrioTCPStream):
                await _handler(stream)
                return
            closed = trio.Event()
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    try:
                        await _handler(ClosingTCPStream(stream.stream, closed))
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                await closed.wait()
                nursery.cancel_scope.cancel()

        reaping._lamina_reaping = True  # type: ignore[attr-defined]
        listener.handler = reaping


async def close_connections(h: Any, conns: list[Any] | None = None) -> None:
    """Close every connection (or those of `conns`) at once: py-libp2p closes them one by one,
    ~0.2 s each (yamux and the swarm both sleep 0.1 s while closing), which is 10 s for a node
    with 50 peers."""

    async def close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception as exc:
            logger.debug("closing %r: %r", conn, exc)

    if conns is None:
        conns = [conn for each in list(h.get_network().connections.values()) for conn in list(each)]
    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(close, conn)
