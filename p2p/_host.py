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

Limits (issue 21): a stream over its handler's per-peer limits (concurrent streams, new streams
a second) gets a BUSY frame before any session starts for it; every frame a peer sends is capped
(the host's `max_message_size`, or the handler's own, lowered further by the handler once it
knows what the session can use), and must arrive at a minimum rate (`_session`); unary requests
and handlers have deadlines; inbound connections are capped in all and while handshaking
(`_limits`).

Around it: `_libp2p` (the py-libp2p host and its adaptations), `_lane_setup` (moving a session
to a lane), `_dht` (the DHT, the routing table's seeding, bootstrap), `_session` over
`_transport` (a session on a libp2p stream or a lane), `_handlers` (a registered handler and
its limits), `_limits` (rate limits, the handshake gate).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from ._addrs import check_ports_free, ip_of, parse_tcp_addr, primary_ip
from ._constants import (
    DEFAULT_MAX_CONCURRENT_PER_PEER,
    DIAL_DEADLINE,
    GOSSIP_MAX_MESSAGE_SIZE,
    HANDSHAKE_DEADLINE,
    HANDSHAKE_EVICT_AGE,
    LANE_CONNECT_DEADLINE,
    LANE_UNREACHABLE_TTL,
    MAX_CONNECTIONS,
    MAX_FRAME_SIZE,
    MAX_HANDSHAKES,
    MAX_HANDSHAKES_PER_IP,
    OPEN_STREAM_DEADLINE,
    RESET_DEADLINE,
    UNARY_HANDLER_DEADLINE,
    UNARY_REQUEST_DEADLINE,
)
from ._dht import DHT, bootstrap, resolve_dht_mode
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
from ._lane import LaneListener, LaneStream, lane_ip
from ._relay import is_relayed, parse_circuit_addr
from ._handlers import Handler, call_handler, describe, rate_limiter, send_error
from ._lane_setup import accept_lane, request_lane, start_lanes
from ._limits import HandshakeGate, gate_libp2p_handshakes, limit_libp2p_connections, refuse_stream
from ._libp2p import (Notifee, close_connections, isolate_libp2p_handlers, new_libp2p_host, reap_inbound_handlers,
                      unsupported)
from ._logging import quiet_libp2p_logging
from ._nat import NatConfig, NatTraversal, is_circuit
from ._reach import is_public_ip
from ._pnet import SwarmKey, dial_failure
from ._messages import ErrorMessage, Message
from ._session import Session, run_session
from ._transport import LaneTransport, StreamTransport

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
    # a private swarm's pre-shared key (see `_pnet`): only peers holding the same key connect
    # (lanes too); None: an open swarm
    swarm_key: SwarmKey | None = None
    # NAT traversal: dial-back checks, relay (offered, and reserved on when not dialable), hole
    # punching (see `_nat`); off by default
    nat: NatConfig = field(default_factory=NatConfig)
    # libp2p connections at once (inbound and outbound), and inbound ones still handshaking
    # (see `_limits`): more are closed at once, unread
    max_connections: int = MAX_CONNECTIONS
    max_handshakes: int = MAX_HANDSHAKES

    def __post_init__(self) -> None:
        if not isinstance(self.identity, Identity):
            raise TypeError("HostConfig.identity must be a p2p.Identity")
        if not self.listen_addrs:
            raise ValueError("HostConfig.listen_addrs must not be empty")
        for a in self.listen_addrs:
            parse_tcp_addr(a, what="listen_addrs")
        for a in self.announce_addrs:
            parse_tcp_addr(a, what="announce_addrs", peer="may")
        for a in self.bootstrap_peers:
            parse_tcp_addr(a, what="bootstrap_peers", peer="must")
        if self.dht_mode not in ("auto", "server", "client"):
            raise ValueError("HostConfig.dht_mode must be 'auto', 'server' or 'client'")
        if self.swarm_key is not None and not isinstance(self.swarm_key, SwarmKey):
            raise TypeError("HostConfig.swarm_key must be a p2p.SwarmKey (SwarmKey.load(path)) or None")
        if not 1024 <= self.max_message_size < 2**32:
            raise ValueError("HostConfig.max_message_size must be in [1 KiB, 4 GiB)")
        if self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("HostConfig.max_connections and max_handshakes must be >= 1")


class Host:
    """A running lamina host. Get one from `open_host`; it is valid inside that block only."""

    def __init__(self, config: HostConfig, libp2p_host: Any) -> None:
        self.config = config
        self.identity = config.identity
        self.libp2p = libp2p_host  # escape hatch: the py-libp2p host
        self.dht: DHT | None = None
        self.gossip: Gossip | None = None
        self._handlers: dict[str, Handler] = {}
        self._on_connected: list[PeerCallback] = []
        self._on_disconnected: list[PeerCallback] = []
        self._nursery: trio.Nursery | None = None
        self.primary_ip = primary_ip()
        self.lanes: LaneListener | None = None  # set while the lane listener is up
        self._unreachable_lanes = ExpiringSet(LANE_UNREACHABLE_TTL)  # (peer, ip) whose lane was not reached
        self.bootstrap_errors: dict[str, P2PError] = {}  # bootstrap peers that could not be dialled, why
        self._swarm_key_bytes = config.swarm_key.key if config.swarm_key is not None else None  # for lanes
        self.nat = NatTraversal(self, config.nat)

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
                if self.primary_ip:
                    out.append(multiaddr.Multiaddr(f"/ip4/{self.primary_ip}{rest}"))
                out.append(multiaddr.Multiaddr(f"/ip4/127.0.0.1{rest}"))
            elif text.startswith("/ip6/::/"):
                out.append(multiaddr.Multiaddr(f"/ip6/::1{text[len('/ip6/::'):]}"))
            else:
                out.append(ma)
        return list({str(a): a for a in out}.values())

    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in /p2p/<our id>: direct ones, or relayed ones
        (…/p2p/<relay>/p2p-circuit/p2p/<our id>) once NAT traversal found we are not dialable."""
        return self.nat.advertised([str(a) for a in self.libp2p.get_addrs()])

    # -- connections -----------------------------------------------------------------------
    def connected_peers(self) -> list[ID]:
        return list(self.libp2p.get_connected_peers())

    def is_connected(self, peer: PeerLike) -> bool:
        return bool(self.libp2p.get_network().get_connections(_as_peer_id(peer)))

    async def connect(self, addr: str) -> ID:
        """Dial a full multiaddr (…/tcp/<port>/p2p/<id>, or a relay's circuit address
        …/p2p/<relay>/p2p-circuit/p2p/<id>) and return the peer id. Raises `PeerTimeoutError` or
        `PeerBrokenError` (unreachable, wrong key, refused, no reservation at the relay)."""
        if is_circuit(addr):
            return await self._connect_circuit(addr)
        ma = parse_tcp_addr(addr, what="connect", peer="must")
        info = PeerInfo(ID.from_base58(ma.value_for_protocol("p2p")), [ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{ma.value_for_protocol('p2p')}"))])
        if info.peer_id == self.peer_id:
            raise LocalProtocolError("cannot connect to ourselves")
        await self._connect(info)
        return info.peer_id

    async def _connect_circuit(self, addr: str) -> ID:
        try:
            target = parse_circuit_addr(addr)[2]
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if target == self.peer_id:
            raise LocalProtocolError("cannot connect to ourselves")
        return await self.nat.connect_circuit(addr)

    async def _connect(self, info: PeerInfo) -> None:
        # py-libp2p refuses to redial a peer for 60 s after a failed dial ("negative cache"):
        # our callers decide when to try again (a liveness probe, a relay coming back)
        self.libp2p.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(DIAL_DEADLINE):
                await self.libp2p.connect(info)
        except trio.TooSlowError:
            raise PeerTimeoutError(f"dialing {info.peer_id} took more than {DIAL_DEADLINE}s", peer_id=info.peer_id) from None
        except Exception as exc:
            raise PeerBrokenError(f"cannot connect to {info.peer_id}: {dial_failure(exc)}", peer_id=info.peer_id) from exc

    def add_addrs(self, peer: PeerLike, addrs: list[str], ttl: float = 3600.0) -> None:
        """Remember multiaddrs for `peer` (with or without their /p2p/ suffix) so that
        `request`/`open_session` can dial it by id. Addresses that are not TCP multiaddrs of
        this peer raise `LocalProtocolError`."""
        peer_id = _as_peer_id(peer)
        parsed = []
        for addr in addrs:
            if is_circuit(addr):   # in our own book: py-libp2p's identify rewrites the peerstore's
                try:
                    relay_addr, relay, target = parse_circuit_addr(addr if addr.endswith(f"/p2p/{peer_id}")
                                                                   else f"{addr}/p2p/{peer_id}")
                except ValueError as exc:
                    raise LocalProtocolError(f"add_addrs: {exc}") from None
                if target != peer_id:
                    raise LocalProtocolError(f"{addr} belongs to {target}, not {peer_id}")
                self.nat.remember_circuit(f"{relay_addr}/p2p/{relay}/p2p-circuit/p2p/{target}", ttl)
                continue
            try:
                ma = parse_tcp_addr(addr, what="add_addrs", peer="may")
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

    async def drop_relayed(self, peer: PeerLike) -> int:
        """Close our relayed connections to `peer`; returns how many. A relay that froze (or
        vanished without a FIN) leaves its circuits in the swarm, silent, and every new stream
        to the peer would go to one of them and hang: a caller whose peer stopped answering
        drops them, so that the next stream dials the peer afresh through its other relays."""
        conns = [c for c in self.libp2p.get_network().get_connections(_as_peer_id(peer)) if is_relayed(c)]
        with trio.move_on_after(RESET_DEADLINE):
            await close_connections(self.libp2p, conns)
        return len(conns)

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
            await self.dht.seed(peer_id)
        for callback in list(self._on_connected if connected else self._on_disconnected):
            try:
                await callback(peer_id)
            except Exception:
                logger.exception("peer %s callback %r failed", "connected" if connected else "disconnected", callback)

    # -- handlers --------------------------------------------------------------------------
    def set_unary_handler(
        self,
        protocol_id: str,
        fn: UnaryHandler,
        *,
        max_concurrent_per_peer: int = DEFAULT_MAX_CONCURRENT_PER_PEER,
        accepts: tuple[type[Message], ...] | type[Message] | None = None,
        max_frame_size: int | None = None,
        open_rate: tuple[float, int] | None = None,
    ) -> None:
        """Serve `protocol_id` with `await fn(peer_id, request) -> response`.

        `accepts` restricts request types (others get a ``"bad_request"`` error). A peer over
        `max_concurrent_per_peer` concurrent requests, or over `open_rate` (requests a second,
        burst) gets ``"busy"``. `max_frame_size`: the largest request taken (default: the host's
        `max_message_size`). The request must arrive within `UNARY_REQUEST_DEADLINE` and `fn`
        answer within `UNARY_HANDLER_DEADLINE`.
        """
        if isinstance(accepts, type):
            accepts = (accepts,)
        self._register(Handler(protocol_id, "unary", fn, max_concurrent_per_peer, accepts,
                                max_frame_size=max_frame_size, opens=rate_limiter(open_rate)))

    def set_session_handler(
        self,
        protocol_id: str,
        fn: SessionHandler,
        *,
        max_concurrent_per_peer: int = DEFAULT_MAX_CONCURRENT_PER_PEER,
        lane: bool = False,
        max_frame_size: int | Callable[[], int] | None = None,
        frame_limit: str = "",
        open_rate: tuple[float, int] | None = None,
    ) -> None:
        """Serve `protocol_id` with `await fn(peer_id, session)`; the session is closed (with a
        goodbye) when fn returns, and reset if it raises (after an error frame to the peer).

        `lane`: clients that open the session with ``lane=True`` get it on a direct lane when
        they can reach one (much lower per-message cost); a protocol is lane-capable on both
        ends or on neither (a client's `LaneHello` is the first message it sends).

        Per-peer limits, refused with ``"busy"`` before the session starts: at most
        `max_concurrent_per_peer` sessions at once, at most `open_rate` = (new sessions a
        second, burst) (None: no rate limit). `max_frame_size` (an int, or a callable read for
        each new session) caps the frames the peer may send, `frame_limit` naming the limit in
        the error; `fn` may lower it further with `Session.limit_incoming`."""
        self._register(Handler(protocol_id, "session", fn, max_concurrent_per_peer, None, lane,
                                max_frame_size=max_frame_size, frame_limit=frame_limit, opens=rate_limiter(open_rate)))

    def remove_handler(self, protocol_id: str) -> None:
        self._handlers.pop(protocol_id, None)
        self.libp2p.remove_stream_handler(TProtocol(protocol_id))

    def _register(self, handler: Handler) -> None:
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

    async def _serve_stream(self, handler: Handler, stream: Any) -> None:
        """py-libp2p's stream handler. Never raises (an escaping exception kills the host).
        A stream over the handler's per-peer limits gets its BUSY frame at once, before any
        session machinery (tasks, timers) starts for it."""
        peer_id = stream.muxed_conn.peer_id
        refusal = handler.refusal(peer_id)
        if refusal is not None:
            logger.debug("refused %s from %s: %s", handler.protocol_id, peer_id, refusal.message)
            await refuse_stream(stream, refusal)
            return
        handler.active[peer_id] = handler.active.get(peer_id, 0) + 1
        limits: dict[str, Any] = dict(max_frame_size=self.config.max_message_size, max_incoming=handler.incoming_limit(),
                      incoming_reason=handler.frame_limit)
        try:
            lane: LaneStream | None = None
            async with run_session(StreamTransport(stream), peer_id, handler.protocol_id, **limits) as session:
                limits["opened_at"] = session.opened_at  # a lane continues this stream
                if handler.kind == "unary":
                    await self._serve_unary(handler, peer_id, session)
                else:
                    if handler.lane:
                        lane = await accept_lane(session, self.lanes if self._offers_lane(stream) else None)
                    if lane is None:
                        await self._serve_session(handler, peer_id, session)
                    else:  # reset, not goodbye: waiting for the client's goodbye delays the lane
                        await session._abort(LocalProtocolError("the session moved to a lane"))
            if lane is not None:  # the libp2p stream is closed; the session goes on over the lane
                async with run_session(LaneTransport(lane), peer_id, handler.protocol_id, **limits) as session:
                    await self._serve_session(handler, peer_id, session)
        except Exception as exc:
            if _only(exc, _STREAM_ENDINGS):  # (possibly wrapped by a nursery on the way out)
                logger.debug("%s stream from %s ended: %r", handler.protocol_id, peer_id, exc)
            else:
                logger.exception("bug while serving %s to %s", handler.protocol_id, peer_id)
        finally:
            left = handler.active.get(peer_id, 1) - 1
            if left:
                handler.active[peer_id] = left
            else:
                handler.active.pop(peer_id, None)

    def _offers_lane(self, stream: Any) -> bool:
        """Whether a lane is worth offering on this stream: not when our dial-back checks found
        the lane port unreachable from outside and the peer is outside (a public address, or a
        relayed connection); a LAN or loopback peer may still reach it."""
        reach = self.nat.reach
        if reach is None or reach.lane_reachable is not False:
            return True
        ip = lane_ip(stream)
        return ip is not None and not is_public_ip(ip)

    async def _serve_unary(self, handler: Handler, peer_id: ID, session: Session) -> None:
        request: Message | None = None
        with trio.move_on_after(UNARY_REQUEST_DEADLINE):
            try:
                request = await session.receive()
            except (EndOfSession, RemoteError):
                return  # the client left without a request, or sent us an error frame
        if request is None:
            reply: Message = ErrorMessage(ErrorCode.BAD_REQUEST, f"no request within {UNARY_REQUEST_DEADLINE:g} s")
        elif handler.accepts is not None and not isinstance(request, handler.accepts):
            reply = ErrorMessage(ErrorCode.BAD_REQUEST, f"{handler.protocol_id} does not accept {type(request).TYPE}")
        else:
            # If the client goes away, stop working for it; and never for longer than the deadline.
            scope = trio.CancelScope(deadline=trio.current_time() + UNARY_HANDLER_DEADLINE)
            session._cancel_on_fail.add(scope)
            reply = ErrorMessage(ErrorCode.INTERNAL, f"the handler took more than {UNARY_HANDLER_DEADLINE:g} s")
            with scope:
                reply = await call_handler(handler, peer_id, request)
            session._cancel_on_fail.discard(scope)
            if scope.cancelled_caught and session.failed is not None:
                return
        try:
            await session.send(reply)
        except LocalProtocolError as exc:  # the reply cannot be sent (too big, say): say so
            logger.warning("%s reply to %s cannot be sent: %s", handler.protocol_id, peer_id, exc)
            await session.send(ErrorMessage(ErrorCode.INTERNAL, f"the response cannot be sent: {exc}"[:1000]))

    async def _serve_session(self, handler: Handler, peer_id: ID, session: Session) -> None:
        try:
            await handler.fn(peer_id, session)
        except RemoteError as exc:
            await send_error(session, ErrorMessage(exc.code, exc.message))
        except (PeerError, RemoteProtocolError):
            if session.failed is None:
                await send_error(session, ErrorMessage(ErrorCode.INTERNAL, "handler failed"))
            raise
        except Exception as exc:
            if session.failed is not None:
                raise PeerBrokenError(f"session failed: {session.failed!r}") from exc
            logger.warning("%s session handler failed for %s", handler.protocol_id, peer_id, exc_info=True)
            await send_error(session, ErrorMessage(ErrorCode.INTERNAL, describe(exc)))

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
                    if unsupported(exc):
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
            if unsupported(exc):
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
        if not addrs and not self.nat.known_circuits(peer_id):
            raise PeerBrokenError(f"no known address for {peer_id}", peer_id=peer_id)
        direct = [a for a in addrs if not is_circuit(str(a))]
        circuits = self.nat.known_circuits(peer_id)
        if circuits:   # a peer behind a NAT: its private addresses (from identify) are not ours to dial
            direct = [a for a in direct if is_public_ip(ip_of(a) or "")]
        failure: P2PError | None = None
        logger.debug("dialling %s: direct %s, circuits %s", peer_id, [str(a) for a in direct], circuits)
        if direct:
            try:
                await self._connect(PeerInfo(peer_id, direct))
                return
            except P2PError as exc:
                failure = exc
        if circuits:   # through a relay: what a peer behind NAT advertises
            await self.nat.connect_any(peer_id, circuits)
            return
        assert failure is not None
        raise failure

    @asynccontextmanager
    async def open_session(self, peer: PeerLike, protocol_id: str, *, lane: bool = False) -> AsyncIterator[Session]:
        """A long-lived bidirectional session with `peer` on `protocol_id` (dialling if needed).
        Leaving the block says goodbye; an exception resets the stream.

        `lane=True` (for protocols whose handler is registered with ``lane=True``): move the
        session to a direct lane when the peer offers one and we can reach it (see `_lane`)."""
        peer_id = _as_peer_id(peer)
        stream = await self._open_stream(peer_id, protocol_id)
        moved: LaneStream | None = None
        async with run_session(StreamTransport(stream), peer_id, protocol_id, max_frame_size=self.config.max_message_size) as session:
            if lane and self.config.enable_lanes:
                try:
                    with trio.fail_after(OPEN_STREAM_DEADLINE + LANE_CONNECT_DEADLINE):
                        moved = await request_lane(session, stream, self._unreachable_lanes, self._swarm_key_bytes)
                except trio.TooSlowError:
                    raise PeerTimeoutError(f"setting up a lane to {peer_id} timed out", peer_id=peer_id) from None
            if moved is None:
                yield session
            else:  # reset, not goodbye: the lane need not wait for a goodbye exchange
                await session._abort(LocalProtocolError("the session moved to a lane"))
        if moved is not None:
            async with run_session(LaneTransport(moved), peer_id, protocol_id, max_frame_size=self.config.max_message_size) as session:
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


# --- open_host ------------------------------------------------------------------------------
@asynccontextmanager
async def open_host(config: HostConfig) -> AsyncIterator[Host]:
    """Start a host with its DHT and gossip, dial the bootstrap peers, yield the `Host`.

    Leaving the block closes every connection and stops every service and task it started.
    """
    quiet_libp2p_logging()
    host_ref: list[Host] = []

    def addrs_factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return host_ref[0]._advertised(candidates) if host_ref else list(candidates)

    check_ports_free(config.listen_addrs)
    h = new_libp2p_host(config.identity.key_pair, config.listen_addrs, addrs_factory, config.swarm_key)
    host = Host(config, h)
    host_ref.append(host)
    listen = [multiaddr.Multiaddr(a) for a in config.listen_addrs]
    try:
        async with h.run(listen):
            reap_inbound_handlers(h)
            network = h.get_network()
            limit_libp2p_connections(network, config.max_connections)
            gate_libp2p_handshakes(network, HandshakeGate(config.max_handshakes, MAX_HANDSHAKES_PER_IP,
                                                          HANDSHAKE_DEADLINE, HANDSHAKE_EVICT_AGE))
            try:
                async with trio.open_nursery() as nursery:
                    host._nursery = nursery
                    try:
                        # gossip first: py-libp2p's pubsub ignores connections made before it starts
                        if config.enable_gossip:
                            host.gossip = Gossip(h, config.gossip_topics, max_message_size=config.gossip_max_message_size)
                            await nursery.start(host.gossip.serve)
                        if config.enable_dht:
                            our_ips = [ip for a in h.get_addrs() if (ip := ip_of(a))]
                            boot_ips = [ip for a in config.bootstrap_peers if (ip := ip_of(multiaddr.Multiaddr(a)))]
                            mode = resolve_dht_mode(config.dht_mode, our_ips, boot_ips, bool(config.announce_addrs))  # type: ignore[arg-type]
                            host.dht = DHT(h, mode)
                            await nursery.start(host.dht.serve)
                        if config.enable_lanes:
                            # on the host of the first listen address
                            bind = ip_of(multiaddr.Multiaddr(config.listen_addrs[0])) or "0.0.0.0"
                            host.lanes = await start_lanes(bind, config.lane_port, nursery, host._swarm_key_bytes)
                        await nursery.start(host.nat.serve)
                        isolate_libp2p_handlers(h)
                        h.get_network().register_notifee(Notifee(host._spawn_peer_event))
                        host.bootstrap_errors = await bootstrap(config.bootstrap_peers, host.connect, host.dht, nursery)
                        yield host
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                host._nursery = None
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await close_connections(h)
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


async def serve_host(config: HostConfig, *, task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED) -> None:
    """`open_host` as a trio service: ``host = await nursery.start(serve_host, config)``; the
    host runs until the nursery is cancelled."""
    async with open_host(config) as host:
        task_status.started(host)
        await trio.sleep_forever()
