"""Moving a session to a direct lane: both ends of the set-up `_lane` describes, run over the
session's libp2p stream, and the lane listener's start.

Each function gets what it needs (the session, the listener, the set of unreachable lanes),
never the `Host`. A session that does not move stays on its libp2p stream: these functions
answer None then, and the caller goes on with the session it has.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._constants import LANE_HELLO_DEADLINE, LANE_TICKET_TTL, LANE_UNREACHABLE_TTL
from ._errors import EndOfSession, P2PError, RemoteError, RemoteProtocolError
from ._expiring import ExpiringSet
from ._lane import LaneDecline, LaneHello, LaneInvite, LaneListener, LaneStream, LaneUnavailable, connect_lane, lane_ip
from ._messages import Message
from ._session import Session

logger = logging.getLogger("lamina.p2p")

__all__ = ["start_lanes", "accept_lane", "request_lane"]


async def start_lanes(bind_host: str, port: int, nursery: trio.Nursery,
                      swarm_key: bytes | None = None) -> LaneListener | None:
    """Start a lane listener on `bind_host`:`port` in `nursery`; None when the port cannot be
    bound (lanes are an optimisation: sessions then stay on libp2p streams). `swarm_key`: a
    private swarm's key, mixed into every lane's keys."""
    listener = LaneListener(bind_host, port, swarm_key)
    try:
        await nursery.start(listener.serve)
    except OSError as exc:
        logger.warning("no direct lanes: cannot listen on %s:%d (%s)", bind_host, port, exc)
        return None
    return listener


async def accept_lane(session: Session, lanes: LaneListener | None) -> LaneStream | None:
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
    offer = lanes.invite() if lanes is not None else None
    if lanes is None or offer is None:
        await session.send(LaneUnavailable("this host has no lane listener" if lanes is None else "too many lanes being set up"))
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
        lanes.withdraw(invite.ticket)
    if declined and ticket.stream is not None:  # the client stays on libp2p: so do we
        await ticket.stream.reset()
        return None
    return ticket.stream


async def request_lane(session: Session, stream: Any, unreachable: ExpiringSet,
                       swarm_key: bytes | None = None) -> LaneStream | None:
    """Client side of the lane set-up: the lane, or None to stay on this session. `stream` is
    the session's libp2p stream (its connection tells the IP to dial); `unreachable` holds the
    (peer, IP) pairs whose lane was not reached lately: they are not asked again; `swarm_key`:
    a private swarm's key (the lane's keys need it)."""
    ip = lane_ip(stream)
    if ip is None:
        return None
    key = (str(session.peer_id), ip)
    if key in unreachable:
        return None
    await session.send(LaneHello())
    reply = await session.receive()
    if type(reply) is LaneUnavailable:
        logger.debug("%s has no lane for %s: %s", session.peer_id, session.protocol_id, reply.reason)
        return None
    if type(reply) is not LaneInvite:
        raise RemoteProtocolError(f"expected a lane invite, got {type(reply).TYPE}")
    try:
        return await connect_lane(ip, reply, swarm_key)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if isinstance(exc, (OSError, trio.TooSlowError)):  # not reached, not just closed on us
            logger.info("cannot reach the lane of %s at %s:%d (%r); staying on libp2p for %.0f s",
                        session.peer_id, ip, reply.port, exc, LANE_UNREACHABLE_TTL)
            unreachable.add(key)
        else:
            logger.info("the lane of %s at %s:%d failed (%r); staying on libp2p",
                        session.peer_id, ip, reply.port, exc)
        await session.send(LaneDecline(repr(exc)[:200]))
        return None
