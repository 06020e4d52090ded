"""`open_host`: one async context manager that owns a py-libp2p host and all its services.

The stack is TCP + Noise + yamux and nothing else: plaintext, secio, TLS and mplex are not
offered, so a dialer that only speaks plaintext is refused during negotiation. Leaving the
context closes every connection, stops gossip and the DHT, and cancels every task we started.

Session handlers registered with ``lane=True`` move their sessions to a direct lane (a
dedicated TCP connection with its own AEAD records, see `_lane`) when the client asks for one
with ``open_session(..., lane=True)`` and can reach it; otherwise they stay on the libp2p
stream. Either way the handler and the client get the same `Session` interface.

Handlers run isolated: whatever a handler raises becomes an `ErrorMessage` frame to the peer
(``RemoteError`` codes pass through; anything else is ``"internal"``) and never reaches
py-libp2p, where an exception escaping a stream handler tears the whole host down.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from ._constants import (
    BOOTSTRAP_DEADLINE,
    DEFAULT_MAX_CONCURRENT_PER_PEER,
    DHT_QUERY_DEADLINE,
    DIAL_DEADLINE,
    GOSSIP_MAX_MESSAGE_SIZE,
    IDENTIFY_WAIT,
    LANE_CONNECT_DEADLINE,
    LANE_HELLO_DEADLINE,
    LANE_TICKET_TTL,
    LANE_UNREACHABLE_TTL,
    MAX_FRAME_SIZE,
    OPEN_STREAM_DEADLINE,
    RESET_DEADLINE,
)
from ._dht import DHT, resolve_dht_mode
from ._errors import (
    EndOfSession,
    ErrorCode,
    LocalProtocolError,
    P2PError,
    PeerBrokenError,
    PeerError,
    PeerTimeoutError,
    RemoteError,
    RemoteProtocolError,
    UnsupportedProtocolError,
    reraise_single,
)
from ._gossip import Gossip
from ._expiring import ExpiringSet
from ._identity import Identity
from ._lane import (LaneDecline, LaneHello, LaneInvite, LaneListener, LaneStream, LaneUnavailable,
                    connect_lane, lane_ip)
from ._logging import quiet_libp2p_logging
from ._messages import REGISTRY, ErrorMessage, Message
from ._session import Session, run_session

logger = logging.getLogger("lamina.p2p")

__all__ = ["HostConfig", "Host", "open_host", "serve_host", "UnaryHandler", "SessionHandler", "PeerCallback"]

UnaryHandler = Callable[[ID, Message], Awaitable[Message]]
SessionHandler = Callable[[ID, Session], Awaitable[None]]
PeerCallback = Callable[[ID], Awaitable[None]]
PeerLike = ID | str


def _as_peer_id(peer: PeerLike) -> ID:
    if isinstance(peer, ID):
        return peer
    if isinstance(peer, str):
        try:
            return ID.from_base58(peer)
        except Exception as exc:
            raise LocalProtocolError(f"not a peer id: {peer!r}") from exc
    raise LocalProtocolError(f"not a peer id: {peer!r}")


def _parse_tcp_addr(text: str, *, what: str, peer: str = "no") -> multiaddr.Multiaddr:
    """Parse a TCP multiaddr; `peer` says whether a /p2p/<id> suffix is "no", "may" or "must"."""
    try:
        ma = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise ValueError(f"{what}: invalid multiaddr {text!r}: {exc}") from exc
    names = [p.name for p in ma.protocols()]
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp" or names[2:] not in ([], ["p2p"]):
        raise ValueError(f"{what}: {text!r} is not a TCP multiaddr (/ip4/<ip>/tcp/<port>[/p2p/<id>])")
    has_peer = names[2:] == ["p2p"]
    if peer == "must" and not has_peer:
        raise ValueError(f"{what}: {text!r} needs a /p2p/<peer id> suffix")
    if peer == "no" and has_peer:
        raise ValueError(f"{what}: {text!r} must not have a /p2p/ suffix")
    return ma


@dataclass
class HostConfig:
    """Everything `open_host` needs. Multiaddrs are strings; TCP only."""

    identity: Identity
    listen_addrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    # what we tell peers instead of our listen addresses (public IP behind port forwarding...)
    announce_addrs: list[str] = field(default_factory=list)
    # full multiaddrs with /p2p/<id>, dialled at startup
    bootstrap_peers: list[str] = field(default_factory=list)
    dht_mode: str = "auto"  # "auto" | "server" | "client", see resolve_dht_mode
    gossip_topics: list[str] = field(default_factory=list)
    max_message_size: int = MAX_FRAME_SIZE  # largest frame we accept and send
    gossip_max_message_size: int = GOSSIP_MAX_MESSAGE_SIZE
    enable_dht: bool = True
    enable_gossip: bool = True
    # direct lanes for sessions of handlers registered with lane=True (see `_lane`): the TCP
    # port they listen on (0: any free port), on the host of the first listen address
    enable_lanes: bool = True
    lane_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.identity, Identity):
            raise TypeError("HostConfig.identity must be a p2p.Identity")
        if not self.listen_addrs:
            raise ValueError("HostConfig.listen_addrs must not be empty")
        for a in self.listen_addrs:
            _parse_tcp_addr(a, what="listen_addrs")
        for a in self.announce_addrs:
            _parse_tcp_addr(a, what="announce_addrs", peer="may")
        for a in self.bootstrap_peers:
            _parse_tcp_addr(a, what="bootstrap_peers", peer="must")
        if self.dht_mode not in ("auto", "server", "client"):
            raise ValueError("HostConfig.dht_mode must be 'auto', 'server' or 'client'")
        if not 1024 <= self.max_message_size < 2**32:
            raise ValueError("HostConfig.max_message_size must be in [1 KiB, 4 GiB)")


@dataclass
class _Handler:
    protocol_id: str
    kind: str  # "unary" | "session"
    fn: Callable[..., Awaitable[Any]]
    max_concurrent_per_peer: int
    accepts: tuple[type[Message], ...] | None
    lane: bool = False
    active: dict[ID, int] = field(default_factory=dict)


def _primary_ip() -> str | None:
    """The local IPv4 address of the default route, if any (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def _ip_of(ma: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return ma.value_for_protocol(proto)
        except Exception:
            continue
    return None


class _Notifee(INotifee):
    """Forwards connection events to the host without blocking the swarm (py-libp2p awaits
    notifees inline on its connection path)."""

    def __init__(self, host: "Host") -> None:
        self._host = host

    async def connected(self, network, conn) -> None:  # type: ignore[no-untyped-def]
        self._host._spawn_peer_event(conn, connected=True)

    async def disconnected(self, network, conn) -> None:  # type: ignore[no-untyped-def]
        self._host._spawn_peer_event(conn, connected=False)

    async def opened_stream(self, network, stream) -> None:  # type: ignore[no-untyped-def]
        return None

    async def closed_stream(self, network, stream) -> None:  # type: ignore[no-untyped-def]
        return None

    async def listen(self, network, multiaddr) -> None:  # type: ignore[no-untyped-def]
        return None

    async def listen_close(self, network, multiaddr) -> None:  # type: ignore[no-untyped-def]
        return None


class Host:
    """A running lamina host. Get one from `open_host`; it is valid inside that block only."""

    def __init__(self, config: HostConfig, libp2p_host: Any) -> None:
        self.config = config
        self.identity = config.identity
        self.libp2p = libp2p_host  # escape hatch: the py-libp2p host
        self.dht: DHT | None = None
        self.gossip: Gossip | None = None
        self._handlers: dict[str, _Handler] = {}
        self._on_connected: list[PeerCallback] = []
        self._on_disconnected: list[PeerCallback] = []
        self._nursery: trio.Nursery | None = None
        self._primary_ip = _primary_ip()
        self.lanes: LaneListener | None = None  # set while the lane listener is up
        self._unreachable_lanes = ExpiringSet(LANE_UNREACHABLE_TTL)  # (peer, ip) whose lane was not reached

    # -- identity and addresses ------------------------------------------------------------
    @property
    def peer_id(self) -> ID:
        return self.identity.peer_id

    @property
    def peer_id_str(self) -> str:
        return self.identity.peer_id_str

    def _advertised(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """addrs_factory for py-libp2p: announce addresses, or listen addresses with wildcards
        replaced by concrete ones (the default-route IP first, then loopback)."""
        if self.config.announce_addrs:
            return [multiaddr.Multiaddr(a) for a in self.config.announce_addrs]
        out: list[multiaddr.Multiaddr] = []
        for ma in candidates:
            text = str(ma)
            if text.startswith("/ip4/0.0.0.0/"):
                rest = text[len("/ip4/0.0.0.0") :]
                if self._primary_ip:
                    out.append(multiaddr.Multiaddr(f"/ip4/{self._primary_ip}{rest}"))
                out.append(multiaddr.Multiaddr(f"/ip4/127.0.0.1{rest}"))
            elif text.startswith("/ip6/::/"):
                out.append(multiaddr.Multiaddr(f"/ip6/::1{text[len('/ip6/::'):]}"))
            else:
                out.append(ma)
        return list({str(a): a for a in out}.values())

    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in /p2p/<our id>."""
        return [str(a) for a in self.libp2p.get_addrs()]

    # -- connections -----------------------------------------------------------------------
    def connected_peers(self) -> list[ID]:
        return list(self.libp2p.get_connected_peers())

    def is_connected(self, peer: PeerLike) -> bool:
        return bool(self.libp2p.get_network().get_connections(_as_peer_id(peer)))

    async def connect(self, addr: str) -> ID:
        """Dial a full multiaddr (…/tcp/<port>/p2p/<id>) and return the peer id. Raises
        `PeerTimeoutError` or `PeerBrokenError` (unreachable, wrong key, refused)."""
        ma = _parse_tcp_addr(addr, what="connect", peer="must")
        info = PeerInfo(ID.from_base58(ma.value_for_protocol("p2p")), [ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{ma.value_for_protocol('p2p')}"))])
        if info.peer_id == self.peer_id:
            raise LocalProtocolError("cannot connect to ourselves")
        await self._connect(info)
        return info.peer_id

    async def _connect(self, info: PeerInfo) -> None:
        try:
            with trio.fail_after(DIAL_DEADLINE):
                await self.libp2p.connect(info)
        except trio.TooSlowError:
            raise PeerTimeoutError(f"dialing {info.peer_id} took more than {DIAL_DEADLINE}s", peer_id=info.peer_id) from None
        except Exception as exc:
            raise PeerBrokenError(f"cannot connect to {info.peer_id}: {exc}", peer_id=info.peer_id) from exc

    def add_addrs(self, peer: PeerLike, addrs: list[str], ttl: float = 3600.0) -> None:
        """Remember multiaddrs for `peer` (with or without their /p2p/ suffix) so that
        `request`/`open_session` can dial it by id. Addresses that are not TCP multiaddrs of
        this peer raise `LocalProtocolError`."""
        peer_id = _as_peer_id(peer)
        parsed = []
        for addr in addrs:
            try:
                ma = _parse_tcp_addr(addr, what="add_addrs", peer="may")
            except ValueError as exc:
                raise LocalProtocolError(str(exc)) from None
            suffix = ma.value_for_protocol("p2p") if "/p2p/" in addr else None
            if suffix is not None:
                if suffix != peer_id.to_base58():
                    raise LocalProtocolError(f"{addr} belongs to {suffix}, not {peer_id}")
                ma = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{suffix}"))
            parsed.append(ma)
        if parsed:
            self.libp2p.get_peerstore().add_addrs(peer_id, parsed, int(ttl))

    async def disconnect(self, peer: PeerLike) -> None:
        with trio.move_on_after(RESET_DEADLINE):
            await self.libp2p.disconnect(_as_peer_id(peer))

    def on_peer_connected(self, callback: PeerCallback) -> None:
        """Call `await callback(peer_id)` for every new connection, inbound or outbound (each
        call isolated: an exception is logged, not raised). With a DHT, callbacks run once the
        peer is identified and, if it is a DHT server, in the routing table (at most
        `IDENTIFY_WAIT` later). Peers connected before registration are not replayed."""
        self._on_connected.append(callback)

    def on_peer_disconnected(self, callback: PeerCallback) -> None:
        self._on_disconnected.append(callback)

    def _spawn_peer_event(self, conn: Any, *, connected: bool) -> None:
        peer_id = getattr(conn.muxed_conn, "peer_id", None)
        if peer_id is None or self._nursery is None:
            return
        self._nursery.start_soon(self._peer_event, peer_id, connected)

    async def _peer_event(self, peer_id: ID, connected: bool) -> None:
        if connected and self.dht is not None:
            await self._seed_routing_table(peer_id)
        for callback in list(self._on_connected if connected else self._on_disconnected):
            try:
                await callback(peer_id)
            except Exception:
                logger.exception("peer %s callback %r failed", "connected" if connected else "disconnected", callback)

    async def _seed_routing_table(self, peer_id: ID) -> None:
        """py-libp2p never adds connected peers to the routing table: wait for identify to
        say whether the peer is a DHT server, then add it."""
        assert self.dht is not None
        peerstore = self.libp2p.get_peerstore()
        with trio.move_on_after(IDENTIFY_WAIT):
            while True:
                try:
                    if peerstore.get_protocols(peer_id):
                        break
                except Exception:
                    pass
                if not self.is_connected(peer_id):
                    return
                await trio.sleep(0.02)  # identify has no completion event to wait on
            try:
                await self.dht.add_peer(peer_id)
            except Exception as exc:
                logger.debug("could not add %s to the routing table: %r", peer_id, exc)

    # -- handlers --------------------------------------------------------------------------
    def set_unary_handler(
        self,
        protocol_id: str,
        fn: UnaryHandler,
        *,
        max_concurrent_per_peer: int = DEFAULT_MAX_CONCURRENT_PER_PEER,
        accepts: tuple[type[Message], ...] | type[Message] | None = None,
    ) -> None:
        """Serve `protocol_id` with `await fn(peer_id, request) -> response`.

        `accepts` restricts request types (others get a ``"bad_request"`` error). A peer over
        `max_concurrent_per_peer` concurrent requests gets ``"busy"``.
        """
        if isinstance(accepts, type):
            accepts = (accepts,)
        self._register(_Handler(protocol_id, "unary", fn, max_concurrent_per_peer, accepts))

    def set_session_handler(
        self,
        protocol_id: str,
        fn: SessionHandler,
        *,
        max_concurrent_per_peer: int = DEFAULT_MAX_CONCURRENT_PER_PEER,
        lane: bool = False,
    ) -> None:
        """Serve `protocol_id` with `await fn(peer_id, session)`; the session is closed (with a
        goodbye) when fn returns, and reset if it raises (after an error frame to the peer).

        `lane`: clients that open the session with ``lane=True`` get it on a direct lane when
        they can reach one (much lower per-message cost); a protocol is lane-capable on both
        ends or on neither (a client's `LaneHello` is the first message it sends)."""
        self._register(_Handler(protocol_id, "session", fn, max_concurrent_per_peer, None, lane))

    def remove_handler(self, protocol_id: str) -> None:
        self._handlers.pop(protocol_id, None)
        self.libp2p.remove_stream_handler(TProtocol(protocol_id))

    def _register(self, handler: _Handler) -> None:
        if not handler.protocol_id.startswith("/"):
            raise LocalProtocolError(f"protocol ids start with '/': {handler.protocol_id!r}")
        if handler.max_concurrent_per_peer < 1:
            raise LocalProtocolError("max_concurrent_per_peer must be >= 1")
        self._handlers[handler.protocol_id] = handler

        async def on_stream(stream: Any) -> None:
            try:
                await self._serve_stream(handler, stream)
            except Exception:  # belt and braces: an exception here would kill the host
                logger.exception("bug in the stream wrapper for %s", handler.protocol_id)

        self.libp2p.set_stream_handler(TProtocol(handler.protocol_id), on_stream)

    async def _serve_stream(self, handler: _Handler, stream: Any) -> None:
        """py-libp2p's stream handler. Never raises (an escaping exception kills the host)."""
        peer_id = stream.muxed_conn.peer_id
        counted = False
        try:
            lane: LaneStream | None = None
            async with run_session(stream, peer_id, handler.protocol_id, max_frame_size=self.config.max_message_size) as session:
                running = handler.active.get(peer_id, 0)
                if running >= handler.max_concurrent_per_peer:
                    await session.send(ErrorMessage(ErrorCode.BUSY, f"more than {handler.max_concurrent_per_peer} concurrent {handler.protocol_id} streams"))
                    return
                handler.active[peer_id] = running + 1
                counted = True
                if handler.kind == "unary":
                    await self._serve_unary(handler, peer_id, session)
                else:
                    if handler.lane:
                        lane = await self._accept_lane(session)
                    if lane is None:
                        await self._serve_session(handler, peer_id, session)
                    else:  # reset, not goodbye: waiting for the client's goodbye delays the lane
                        await session._abort(LocalProtocolError("the session moved to a lane"))
            if lane is not None:  # the libp2p stream is closed; the session goes on over the lane
                async with run_session(lane, peer_id, handler.protocol_id, max_frame_size=self.config.max_message_size) as session:
                    await self._serve_session(handler, peer_id, session)
        except Exception as exc:
            if _only(exc, _STREAM_ENDINGS):  # (possibly wrapped by a nursery on the way out)
                logger.debug("%s stream from %s ended: %r", handler.protocol_id, peer_id, exc)
            else:
                logger.exception("bug while serving %s to %s", handler.protocol_id, peer_id)
        finally:
            if counted:
                left = handler.active.get(peer_id, 1) - 1
                if left:
                    handler.active[peer_id] = left
                else:
                    handler.active.pop(peer_id, None)

    async def _accept_lane(self, session: Session) -> LaneStream | None:
        """Server side of the lane set-up (see `_lane`): the lane the client moved to, or None
        to stay on this session (the client did not ask, could not connect, or we have no
        lanes). A first message that is not a `LaneHello` is left for the handler."""
        first: Message | None = None
        with trio.move_on_after(LANE_HELLO_DEADLINE):
            try:
                first = await session.receive()
            except (EndOfSession, RemoteError):
                return None  # the handler sees the same when it reads
        if first is None:
            return None
        if type(first) is not LaneHello:
            session._unreceive(first)
            return None
        offer = self.lanes.invite() if self.lanes is not None else None
        if offer is None:
            await session.send(LaneUnavailable("this host has no lane listener" if self.lanes is None else "too many lanes being set up"))
            return None
        invite, ticket = offer
        await session.send(invite)
        declined = False
        try:
            with trio.move_on_after(LANE_TICKET_TTL):
                async with trio.open_nursery() as nursery:

                    async def client_answer() -> None:
                        nonlocal declined
                        try:
                            msg = await session.receive()
                        except P2PError:
                            pass  # after a lane arrived, the client resets this stream
                        else:
                            declined = True  # LaneDecline, or the client went on without a lane
                            if type(msg) is not LaneDecline:
                                session._unreceive(msg)
                        nursery.cancel_scope.cancel()

                    async def lane_arrival() -> None:
                        await ticket.arrived.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(client_answer)
                    nursery.start_soon(lane_arrival)
        finally:
            self.lanes.withdraw(invite.ticket)
        if declined and ticket.stream is not None:  # the client stays on libp2p: so do we
            await ticket.stream.reset()
            return None
        return ticket.stream

    async def _request_lane(self, session: Session, stream: Any) -> LaneStream | None:
        """Client side of the lane set-up: the lane, or None to stay on this session."""
        ip = lane_ip(stream)
        if ip is None:
            return None
        key = (str(session.peer_id), ip)
        if key in self._unreachable_lanes:
            return None
        await session.send(LaneHello())
        reply = await session.receive()
        if type(reply) is LaneUnavailable:
            logger.debug("%s has no lane for %s: %s", session.peer_id, session.protocol_id, reply.reason)
            return None
        if type(reply) is not LaneInvite:
            raise RemoteProtocolError(f"expected a lane invite, got {type(reply).TYPE}")
        try:
            return await connect_lane(ip, reply)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if isinstance(exc, (OSError, trio.TooSlowError)):  # not reached, not just closed on us
                logger.info("cannot reach the lane of %s at %s:%d (%r); staying on libp2p for %.0f s",
                            session.peer_id, ip, reply.port, exc, LANE_UNREACHABLE_TTL)
                self._unreachable_lanes.add(key)
            else:
                logger.info("the lane of %s at %s:%d failed (%r); staying on libp2p",
                            session.peer_id, ip, reply.port, exc)
            await session.send(LaneDecline(repr(exc)[:200]))
            return None

    async def _serve_unary(self, handler: _Handler, peer_id: ID, session: Session) -> None:
        try:
            request = await session.receive()
        except (EndOfSession, RemoteError):
            return  # the client left without a request, or sent us an error frame
        if handler.accepts is not None and not isinstance(request, handler.accepts):
            reply: Message = ErrorMessage(ErrorCode.BAD_REQUEST, f"{handler.protocol_id} does not accept {type(request).TYPE}")
        else:
            # If the client goes away, stop working for it.
            scope = trio.CancelScope()
            session._cancel_on_fail.add(scope)
            reply = ErrorMessage(ErrorCode.INTERNAL, "handler cancelled")
            with scope:
                reply = await _call_handler(handler, peer_id, request)
            session._cancel_on_fail.discard(scope)
            if scope.cancelled_caught:
                return
        try:
            await session.send(reply)
        except LocalProtocolError as exc:  # the reply cannot be sent (too big, say): say so
            logger.warning("%s reply to %s cannot be sent: %s", handler.protocol_id, peer_id, exc)
            await session.send(ErrorMessage(ErrorCode.INTERNAL, f"the response cannot be sent: {exc}"[:1000]))

    async def _serve_session(self, handler: _Handler, peer_id: ID, session: Session) -> None:
        try:
            await handler.fn(peer_id, session)
        except RemoteError as exc:
            await _send_error(session, ErrorMessage(exc.code, exc.message))
        except (PeerError, RemoteProtocolError):
            if session.failed is None:
                await _send_error(session, ErrorMessage(ErrorCode.INTERNAL, "handler failed"))
            raise
        except Exception as exc:
            if session.failed is not None:
                raise PeerBrokenError(f"session failed: {session.failed!r}") from exc
            logger.warning("%s session handler failed for %s", handler.protocol_id, peer_id, exc_info=True)
            await _send_error(session, ErrorMessage(ErrorCode.INTERNAL, _describe(exc)))

    # -- client side -----------------------------------------------------------------------
    async def _open_stream(self, peer_id: ID, protocol_id: str) -> Any:
        if peer_id == self.peer_id:
            raise LocalProtocolError("cannot open a stream to ourselves")
        try:
            with trio.fail_after(OPEN_STREAM_DEADLINE):
                if not self.is_connected(peer_id):
                    await self._dial_known(peer_id)
                try:
                    return await self.libp2p.new_stream(peer_id, [TProtocol(protocol_id)])
                except Exception as exc:
                    if _unsupported(exc):
                        raise
                    # The connection we had was going away (py-libp2p: "No valid connections
                    # available", seen between two nodes that dialled each other at once):
                    # dial again and retry once, within the same deadline.
                    logger.debug("opening %s to %s failed (%r); redialling once", protocol_id, peer_id, exc)
                    with trio.move_on_after(RESET_DEADLINE):
                        await self.libp2p.disconnect(peer_id)    # drop the dead connection first
                    await self._dial_known(peer_id)
                    return await self.libp2p.new_stream(peer_id, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise PeerTimeoutError(f"opening {protocol_id} to {peer_id} took more than {OPEN_STREAM_DEADLINE}s", peer_id=peer_id) from None
        except P2PError:
            raise
        except Exception as exc:
            if _unsupported(exc):
                raise UnsupportedProtocolError(f"{peer_id} does not serve {protocol_id}", peer_id=peer_id) from exc
            raise PeerBrokenError(f"cannot open {protocol_id} to {peer_id}: {exc}", peer_id=peer_id) from exc

    async def _dial_known(self, peer_id: ID) -> None:
        addrs = []
        try:
            addrs = self.libp2p.get_peerstore().addrs(peer_id)
        except Exception:
            pass
        if not addrs and self.dht is not None:
            found = await self.dht.find_peer(peer_id)
            addrs = [multiaddr.Multiaddr(a) for a in found]
        if not addrs:
            raise PeerBrokenError(f"no known address for {peer_id}", peer_id=peer_id)
        await self._connect(PeerInfo(peer_id, addrs))

    @asynccontextmanager
    async def open_session(self, peer: PeerLike, protocol_id: str, *, lane: bool = False) -> AsyncIterator[Session]:
        """A long-lived bidirectional session with `peer` on `protocol_id` (dialling if needed).
        Leaving the block says goodbye; an exception resets the stream.

        `lane=True` (for protocols whose handler is registered with ``lane=True``): move the
        session to a direct lane when the peer offers one and we can reach it (see `_lane`)."""
        peer_id = _as_peer_id(peer)
        stream = await self._open_stream(peer_id, protocol_id)
        moved: LaneStream | None = None
        async with run_session(stream, peer_id, protocol_id, max_frame_size=self.config.max_message_size) as session:
            if lane and self.config.enable_lanes:
                try:
                    with trio.fail_after(OPEN_STREAM_DEADLINE + LANE_CONNECT_DEADLINE):
                        moved = await self._request_lane(session, stream)
                except trio.TooSlowError:
                    raise PeerTimeoutError(f"setting up a lane to {peer_id} timed out", peer_id=peer_id) from None
            if moved is None:
                yield session
            else:  # reset, not goodbye: the lane need not wait for a goodbye exchange
                await session._abort(LocalProtocolError("the session moved to a lane"))
        if moved is not None:
            async with run_session(moved, peer_id, protocol_id, max_frame_size=self.config.max_message_size) as session:
                yield session

    async def request(self, peer: PeerLike, protocol_id: str, msg: Message) -> Message:
        """Send one request, return the response. Raises `RemoteError` (the peer answered with
        an error frame), `PeerBrokenError`, `PeerTimeoutError`/`PeerFrozenError`,
        `RemoteProtocolError`, `UnsupportedProtocolError`."""
        error: RemoteError | None = None
        async with self.open_session(peer, protocol_id) as session:
            await session.send(msg)
            try:
                reply = await session.receive()
            except RemoteError as exc:
                error = exc  # close the session cleanly first, then raise
            except EndOfSession:
                raise PeerBrokenError(f"{protocol_id} on {peer} ended without a response", peer_id=session.peer_id) from None
        if error is not None:
            raise error
        return reply


def _unsupported(exc: BaseException) -> bool:
    """py-libp2p's way of saying the peer does not serve a protocol."""
    return "not supported" in str(exc) or "not supported" in str(exc.__cause__)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


async def _call_handler(handler: _Handler, peer_id: ID, request: Message) -> Message:
    """Run a unary handler; turn whatever it raises or returns wrongly into an error frame."""
    try:
        reply = await handler.fn(peer_id, request)
    except RemoteError as exc:
        return ErrorMessage(exc.code, exc.message)
    except Exception as exc:
        logger.warning("%s handler failed for %s", handler.protocol_id, peer_id, exc_info=True)
        return ErrorMessage(ErrorCode.INTERNAL, _describe(exc))
    if not isinstance(reply, Message) or REGISTRY.get(type(reply).TYPE) is not type(reply):
        logger.warning("%s handler returned %r, not a registered message", handler.protocol_id, type(reply))
        return ErrorMessage(ErrorCode.INTERNAL, "handler returned an invalid response")
    return reply


async def _send_error(session: Session, error: ErrorMessage) -> None:
    if session.failed is not None:
        return
    with trio.move_on_after(RESET_DEADLINE):
        try:
            await session.send(error)
        except P2PError:
            pass


# --- open_host ------------------------------------------------------------------------------
def _libp2p_host(config: HostConfig, host_ref: list[Host]) -> Any:
    kp = config.identity.key_pair
    listen = [multiaddr.Multiaddr(a) for a in config.listen_addrs]

    def addrs_factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return host_ref[0]._advertised(candidates) if host_ref else list(candidates)

    return new_host(
        key_pair=kp,
        listen_addrs=listen,
        # Noise only: new_host's default also offers TLS, secio and plaintext.
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
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
    )


@asynccontextmanager
async def open_host(config: HostConfig) -> AsyncIterator[Host]:
    """Start a host with its DHT and gossip, dial the bootstrap peers, yield the `Host`.

    Leaving the block closes every connection and stops every service and task it started.
    """
    quiet_libp2p_logging()
    host_ref: list[Host] = []
    h = _libp2p_host(config, host_ref)
    host = Host(config, h)
    host_ref.append(host)
    listen = [multiaddr.Multiaddr(a) for a in config.listen_addrs]
    try:
        async with h.run(listen):
            _reap_inbound_handlers(h)
            try:
                async with trio.open_nursery() as nursery:
                    host._nursery = nursery
                    try:
                        # gossip first: py-libp2p's pubsub ignores connections made before it starts
                        if config.enable_gossip:
                            host.gossip = Gossip(h, config.gossip_topics, max_message_size=config.gossip_max_message_size)
                            await nursery.start(host.gossip.serve)
                        if config.enable_dht:
                            our_ips = [ip for a in h.get_addrs() if (ip := _ip_of(a))]
                            boot_ips = [ip for a in config.bootstrap_peers if (ip := _ip_of(multiaddr.Multiaddr(a)))]
                            mode = resolve_dht_mode(config.dht_mode, our_ips, boot_ips, bool(config.announce_addrs))  # type: ignore[arg-type]
                            host.dht = DHT(h, mode)
                            await nursery.start(host.dht.serve)
                        if config.enable_lanes:
                            await _start_lanes(host, nursery)
                        _isolate_libp2p_handlers(h)
                        h.get_network().register_notifee(_Notifee(host))
                        await _bootstrap(host)
                        yield host
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                host._nursery = None
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await _close_connections(h)
                    await h.close()  # inside run(): leaving run() alone leaves connections open
    except BaseExceptionGroup as group:
        # py-libp2p's and our nurseries wrap whatever the body raised; hand it on as itself
        reraise_single(group)


# how a served stream ends when the peer (or the bytes it sent) ended it: not a bug of ours
_STREAM_ENDINGS = (PeerError, LocalProtocolError, RemoteProtocolError, EndOfSession)


def _only(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """`exc` is one of `kinds`, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


async def _start_lanes(host: Host, nursery: trio.Nursery) -> None:
    """Start the lane listener on the host of the first listen address. Lanes are an
    optimisation: when the port cannot be bound, sessions stay on libp2p streams."""
    bind = _ip_of(multiaddr.Multiaddr(host.config.listen_addrs[0])) or "0.0.0.0"
    listener = LaneListener(bind, host.config.lane_port)
    try:
        await nursery.start(listener.serve)
    except OSError as exc:
        logger.warning("no direct lanes: cannot listen on %s:%d (%s)", bind, host.config.lane_port, exc)
        return
    host.lanes = listener


class _ClosingTCPStream(TrioTCPStream):
    """A TCP stream that says when it has been closed."""

    def __init__(self, stream: trio.SocketStream, closed: trio.Event) -> None:
        super().__init__(stream)
        self._closed_event = closed

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._closed_event.set()


def _isolate_libp2p_handlers(h: Any) -> None:
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


def _reap_inbound_handlers(h: Any) -> None:
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
                        await _handler(_ClosingTCPStream(stream.stream, closed))
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                await closed.wait()
                nursery.cancel_scope.cancel()

        reaping._lamina_reaping = True  # type: ignore[attr-defined]
        listener.handler = reaping


async def _close_connections(h: Any) -> None:
    """Close every connection at once: py-libp2p closes them one by one, ~0.2 s each (yamux and
    the swarm both sleep 0.1 s while closing), which is 10 s for a node with 50 peers."""

    async def close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception as exc:
            logger.debug("closing %r: %r", conn, exc)

    async with trio.open_nursery() as nursery:
        for conns in list(h.get_network().connections.values()):
            for conn in list(conns):
                nursery.start_soon(close, conn)


async def serve_host(config: HostConfig, *, task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED) -> None:
    """`open_host` as a trio service: ``host = await nursery.start(serve_host, config)``; the
    host runs until the nursery is cancelled."""
    async with open_host(config) as host:
        task_status.started(host)
        await trio.sleep_forever()


async def _bootstrap(host: Host) -> None:
    """Dial the bootstrap peers (concurrently; failures are logged) and, with a DHT, look
    ourselves up so the routing table learns the swarm."""
    if not host.config.bootstrap_peers:
        return
    connected = 0

    async def dial(addr: str) -> None:
        nonlocal connected
        try:
            await host.connect(addr)
            connected += 1
        except P2PError as exc:
            logger.warning("bootstrap peer %s unreachable: %s", addr, exc)

    with trio.move_on_after(BOOTSTRAP_DEADLINE):
        async with trio.open_nursery() as nursery:
            for addr in host.config.bootstrap_peers:
                nursery.start_soon(dial, addr)
        if connected and host.dht is not None:
            # the routing table is seeded by _peer_event once identify completes; wait for it
            with trio.move_on_after(IDENTIFY_WAIT):
                while not host.dht.routing_table_peers():
                    await trio.sleep(0.02)
    if not connected:
        logger.warning("no bootstrap peer reachable; running alone")
    elif host.dht is not None and host._nursery is not None:
        # In the background: the lookup asks peers it learns of, and one that does not answer
        # (a frozen process, a sleeping laptop) held the host's start for the whole deadline.
        host._nursery.start_soon(_refresh_dht, host.dht)


async def _refresh_dht(dht: DHT) -> None:
    with trio.move_on_after(DHT_QUERY_DEADLINE):
        try:
            await dht.refresh()
        except Exception as exc:  # py-libp2p raises assorted errors; a lookup must not kill the host
            logger.warning("DHT bootstrap lookup failed: %r", exc)

