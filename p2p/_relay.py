"""Circuit relay v2 for lamina: the relay (hop) and stop sides, on py-libp2p 0.8.1's
`CircuitV2Protocol` with its gaps fixed. The client side (dialling a circuit address, keeping
reservations) is `_relay_client`. Everything takes the py-libp2p host (``host.libp2p``), never
our `Host`:

* **relay**, on reachable nodes: ``relay = await nursery.start(serve_relay, h, RelayLimits())``
  serves reservations and circuits (and the stop side too);
* **stop**, on every other host: ``await nursery.start(serve_stop, h)`` accepts relayed
  connections (a target must serve it to be reached through a relay).

What py-libp2p gets wrong, and what this module does instead (see notes/py-libp2p-nat.md):

* circuits were tracked in ``_active_relays[peer_id]``, so the end of one circuit to a target
  closed the streams of every other circuit to it. Here the CONNECT path is ours: each circuit
  is a `_Circuit` owning its two streams, budget and fate; ending one touches nothing else;
* a reservation outlived its peer's disconnection until its TTL (an hour), so a full relay
  refused newcomers while holding slots for peers long gone. Here a swarm notifee frees the slot
  when the peer's last connection closes, and each RESERVE first prunes slots of disconnected
  peers (in case an event was missed);
* a RESERVE's ``peer`` field chose whose slot was made, so any peer could fill the relay with
  slots for made-up ids. Here the slot is always the requesting connection's peer's;
* the relay loop read with no deadline (an idle circuit outlived its duration cap), retried
  reads at EOF with sleeps, and ended circuits by cancelling reads and writes in flight. A
  py-libp2p stream must never be cancelled mid-I/O: a read sends a window update, a write a
  frame, and a frame cut halfway corrupts the Noise stream of the whole connection (a circuit
  cut by its data limit killed the target's connection to the relay, reservation and all: seen
  here in one run of two). Here the copying tasks are never cancelled: a watcher enforces the
  duration, write-stall and half-close deadlines and ends a circuit by resetting its streams
  (waking our own reader, which py-libp2p's yamux leaves asleep on a local reset); a peer whose
  write is still stuck after that is wedged, and its connection is closed under it;
* a handler raising kills the whole host: both handlers here catch everything and reset.

Limits (`RelayLimits`): lamina relays carry inference (activations both ways for whole
generations), not only hole-punching handshakes as go-libp2p's default relay (2 min, 128 KiB)
does. A circuit may carry 1 GiB each way and last an hour: one that hits either is reset and
its dialer redials, which breaks the sessions on it, so the caps sit where that stays rare.
What bounds the relay's load is the number of circuits (`max_circuits`, and
`max_circuits_per_peer` to one target); an idle one costs three tasks and two yamux streams.
Reservations: 128 slots of one hour, renewed by clients at half their TTL.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits as _Libp2pRelayLimits
from libp2p.relay.circuit_v2.utils import maybe_consume_signed_record, read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from ._constants import RESET_DEADLINE
from ._libp2p import Notifee

logger = logging.getLogger("lamina.p2p")

__all__ = ["HOP_PROTOCOL_ID", "STOP_PROTOCOL_ID", "RelayLimits", "Relay", "serve_relay", "serve_stop",
           "parse_circuit_addr", "circuit_addr", "is_relayed"]

HOP_PROTOCOL_ID: TProtocol = PROTOCOL_ID

HOP_DEADLINE = 15.0  # a hop stream's control phase: request, reservation or STOP handshake, status
STOP_DEADLINE = 20.0  # a stop stream: the relay's CONNECT, our status, the inbound upgrade
RELAY_WRITE_DEADLINE = 30.0  # a circuit write that makes no progress this long cuts the circuit
HALF_CLOSE_GRACE = 10.0  # once one side of a circuit has closed, the other has this long to follow
STUCK_GRACE = 2.0  # after a cut, a copying task still blocked this long gets its connection closed
RELAY_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """What a relay grants; see the module docstring for why these defaults."""

    max_reservations: int = 128
    reservation_ttl: int = 3600  # seconds; clients renew at half of it
    max_circuits: int = 512  # circuits relayed at once, all targets together
    max_circuits_per_peer: int = 32  # circuits to one target at once
    circuit_duration: int = 3600  # seconds; then the circuit is reset (0: no cap)
    circuit_bytes: int = 1 << 30  # bytes relayed in each direction of one circuit (0: no cap)

    def __post_init__(self) -> None:
        for name in ("max_reservations", "reservation_ttl", "max_circuits", "max_circuits_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"RelayLimits.{name} must be >= 1")
        if self.circuit_duration < 0 or self.circuit_bytes < 0:
            raise ValueError("RelayLimits.circuit_duration and circuit_bytes must be >= 0")

    def to_libp2p(self) -> _Libp2pRelayLimits:
        return _Libp2pRelayLimits(duration=self.circuit_duration, data=self.circuit_bytes,
                                  max_circuit_conns=self.max_circuits_per_peer,
                                  max_reservations=self.max_reservations, reservation_ttl=self.reservation_ttl)


# --- addresses -------------------------------------------------------------------------------
def parse_circuit_addr(addr: str | multiaddr.Multiaddr) -> tuple[multiaddr.Multiaddr, ID, ID]:
    """``<relay transport addr>/p2p/<relay>/p2p-circuit/p2p/<target>`` -> (relay transport addr
    without /p2p, relay id, target id). Raises ValueError for anything else."""
    text = str(addr)
    head, sep, tail = text.partition("/p2p-circuit")
    if not sep or not tail.startswith("/p2p/") or tail.count("/") != 2:
        raise ValueError(f"not a circuit address (…/p2p/<relay>/p2p-circuit/p2p/<target>): {text!r}")
    relay_part, psep, relay_text = head.rpartition("/p2p/")
    if not psep or not relay_part or "/" in relay_text:
        raise ValueError(f"a circuit address needs the relay's transport address and id: {text!r}")
    try:
        multiaddr.Multiaddr(text)  # the ids must be valid multihashes
        relay_addr = multiaddr.Multiaddr(relay_part)
        relay_id, target_id = ID.from_base58(relay_text), ID.from_base58(tail[len("/p2p/"):])
    except Exception as exc:
        raise ValueError(f"invalid circuit address {text!r}: {exc}") from exc
    if relay_id == target_id:
        raise ValueError(f"a circuit address whose relay is its target: {text!r}")
    return relay_addr, relay_id, target_id


def circuit_addr(relay_addr: str | multiaddr.Multiaddr, relay_id: ID, target_id: ID) -> str:
    """The circuit address of `target_id` through the relay at `relay_addr` (with or without
    its /p2p/<relay> suffix)."""
    return f"{_strip_p2p(relay_addr)}/p2p/{relay_id.to_base58()}/p2p-circuit/p2p/{target_id.to_base58()}"


def _strip_p2p(addr: str | multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    text = str(addr)
    head, sep, _ = text.partition("/p2p/")
    return multiaddr.Multiaddr(head if sep else text)


def is_relayed(conn: Any) -> bool:
    """Whether a swarm connection runs through a relay."""
    try:
        return conn.get_connection_type() == ConnectionType.RELAYED or any(
            "/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


async def _reset(stream: Any) -> None:
    """Reset a stream, bounded and never raising (also while being cancelled)."""
    if stream is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
        try:
            await stream.reset()
        except Exception:
            pass


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
        try:
            await stream.close()
        except Exception:
            await _reset(stream)


def _yamux_event(stream: Any) -> tuple[Any, Any, trio.Event | None]:
    """(yamux connection, stream id, the event its reader waits on) of a py-libp2p stream."""
    muxed = getattr(stream, "muxed_stream", None)
    conn, sid = getattr(muxed, "conn", None), getattr(muxed, "stream_id", None)
    events = getattr(conn, "stream_events", None)
    return conn, sid, events.get(sid) if isinstance(events, dict) else None


async def _reset_and_wake(stream: Any) -> None:
    """Reset `stream` and wake our own task blocked reading it: py-libp2p's yamux drops the
    event a reader waits on when the stream is reset locally, without setting it."""
    _, _, event = _yamux_event(stream)
    await _reset(stream)
    if event is not None:
        event.set()


def _forget(stream: Any) -> None:
    """Drop the event yamux's woken reader put back for a stream it had already dropped."""
    conn, sid, _ = _yamux_event(stream)
    if conn is not None and sid not in getattr(conn, "streams", {sid: None}):
        conn.stream_events.pop(sid, None)


async def _kill(stream: Any) -> None:
    """Close the connection under `stream` (a write stuck in it cannot be cut without corrupting it)."""
    secured = getattr(getattr(stream, "muxed_conn", None), "secured_conn", None)
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
        try:
            await (secured.close() if secured is not None else stream.reset())
        except Exception:
            pass


# --- the relay and stop side -----------------------------------------------------------------
@dataclass(eq=False)
class _Circuit:
    """One relayed connection: its own streams, budget and fate, whatever else goes to its target.
    Direction 0 copies src (the source's hop stream) to dst (our stop stream to the target)."""

    source: ID
    target: ID
    src: Any
    dst: Any
    bytes_left: list[int | None]  # per direction
    deadline: float  # trio time: the duration cap
    reason: str | None = None  # why it was cut; None while running or when both sides closed
    eofs: int = 0
    grace_until: float = math.inf  # set when one side closed
    writing_since: list[float | None] = field(default_factory=lambda: [None, None])
    blocked_on: list[Any] = field(default_factory=lambda: [None, None])  # the stream each copier waits on
    copiers: int = 2
    done: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event = field(default_factory=trio.Event)
    started: float = field(default_factory=trio.current_time)

    def poke(self) -> None:
        self.wake.set()

    def cut(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.poke()

    def next_deadline(self) -> float:
        stalls = [t + RELAY_WRITE_DEADLINE for t in self.writing_since if t is not None]
        return min([self.deadline, self.grace_until, *stalls])

    def expired(self, now: float) -> str | None:
        if now >= self.deadline:
            return "duration limit"
        if now >= self.grace_until:
            return "half-closed too long"
        if any(t is not None and now >= t + RELAY_WRITE_DEADLINE for t in self.writing_since):
            return "write stalled"
        return None


class Relay(CircuitV2Protocol):
    """py-libp2p's circuit v2 protocol with lamina's fixes (module docstring). Run it with
    `serve_relay` (hop and stop) or `serve_stop` (stop only)."""

    def __init__(self, libp2p_host: Any, limits: RelayLimits | None = None, *, allow_hop: bool = True) -> None:
        self.lamina_limits = limits or RelayLimits()
        super().__init__(libp2p_host, limits=self.lamina_limits.to_libp2p(), allow_hop=allow_hop,
                         read_timeout=int(HOP_DEADLINE), write_timeout=int(HOP_DEADLINE),
                         close_timeout=int(RESET_DEADLINE))
        self._circuits: set[_Circuit] = set()
        self._opening = 0  # circuits in their STOP handshake

    # -- state, for callers and tests -----------------------------------------------------------
    def reservations(self) -> list[ID]:
        """Peers holding a live slot here."""
        self.resource_manager._clean_expired()
        return list(self.resource_manager._reservations)

    def circuits(self) -> list[tuple[ID, ID]]:
        """(source, target) of each circuit being relayed."""
        return [(c.source, c.target) for c in self._circuits]

    # -- slots ----------------------------------------------------------------------------------
    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().connections.get(peer))

    def _on_conn_event(self, conn: Any, *, connected: bool) -> None:
        """Free a peer's slot when its last connection closes (py-libp2p keeps it until TTL)."""
        peer = getattr(getattr(conn, "muxed_conn", None), "peer_id", None)
        if connected or peer is None or self._connected(peer):
            return
        if self.resource_manager._reservations.pop(peer, None) is not None:
            logger.debug("relay: %s disconnected, its reservation is freed", peer)

    def _prune_disconnected(self) -> None:
        slots = self.resource_manager._reservations
        for peer in [p for p in slots if not self._connected(p)]:
            del slots[peer]

    # -- hop ------------------------------------------------------------------------------------
    async def _handle_hop_stream(self, stream: Any) -> None:  # py-libp2p's handler, replaced
        """One request per stream (as go and rust relays do). Never raises."""
        try:
            circuit = None
            with trio.fail_after(HOP_DEADLINE):
                circuit = await self._hop_request(stream)
            if circuit is not None:
                await self._run_circuit(circuit)
        except Exception as exc:
            logger.debug("relay: hop stream from %s failed: %r", _peer_of(stream), exc)
            await _reset(stream)

    async def _hop_request(self, stream: Any) -> _Circuit | None:
        source = stream.muxed_conn.peer_id
        if _is_relayed_stream(stream):  # spec: no reservations or circuits over relayed connections
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return None
        msg = await read_delimited_msg(stream, HopMessage)
        if msg.HasField("senderRecord") and not maybe_consume_signed_record(msg, self.host, source):
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return None
        if msg.type == HopMessage.RESERVE:
            msg.ClearField("peer")  # the slot is the requester's, whatever the message says
            self._prune_disconnected()
            await self._handle_reserve(stream, msg)
            await _close(stream)
            return None
        if msg.type != HopMessage.CONNECT or not msg.HasField("peer"):
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE)
            return None
        return await self._open_circuit(stream, source, ID(msg.peer.id))

    async def _refuse(self, stream: Any, code: StatusCode) -> None:
        await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
        await _close(stream)

    def _limit(self) -> Limit:
        return Limit(duration=self.lamina_limits.circuit_duration, data=self.lamina_limits.circuit_bytes)

    async def _open_circuit(self, stream: Any, source: ID, target: ID) -> _Circuit | None:
        """Check the target's slot, do the STOP handshake with it, answer the source."""
        if len(self._circuits) + self._opening >= self.lamina_limits.max_circuits:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return None
        reservation = self.resource_manager.get_reservation(target)  # None unless connected
        if reservation is None or target == source:
            await self._refuse(stream, StatusCode.NO_RESERVATION)
            return None
        if not reservation.can_accept_connection():
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return None
        reservation.active_connections += 1  # before any await: concurrent CONNECTs count
        self._opening += 1
        dst = None
        try:
            dst = await self.host.new_stream(target, [STOP_PROTOCOL_ID])
            await write_delimited_msg(dst, StopMessage(type=StopMessage.CONNECT, peer=PbPeerId(id=source.to_bytes()),
                                                       limit=self._limit()))
            reply = await read_delimited_msg(dst, StopMessage)
            if reply.type != StopMessage.STATUS or reply.status != StatusCode.OK:
                raise ConnectionError(f"target answered STOP with status {reply.status}")
            ok = HopMessage(type=HopMessage.STATUS, status=to_proto_status(StatusCode.OK), limit=self._limit())
            await write_delimited_msg(stream, ok)
        except BaseException as exc:
            self.resource_manager.release_connection(target)
            await _reset(dst)
            if not isinstance(exc, Exception):
                raise
            logger.debug("relay: circuit %s -> %s not opened: %r", source, target, exc)
            with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
                await self._refuse(stream, StatusCode.CONNECTION_FAILED)
            return None
        finally:
            self._opening -= 1
        limits = self.lamina_limits
        deadline = trio.current_time() + limits.circuit_duration if limits.circuit_duration else math.inf
        budget = limits.circuit_bytes or None
        return _Circuit(source, target, stream, dst, [budget, budget], deadline)

    async def _run_circuit(self, c: _Circuit) -> None:
        """Copy both ways until both sides close or the circuit is cut. The copiers are never
        cancelled (module docstring): a cut resets the streams, which ends them."""
        self._circuits.add(c)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, c, 0)
                nursery.start_soon(self._copy, c, 1)
                await self._watch(c)
                if c.reason is not None:
                    await _reset_and_wake(c.src)
                    await _reset_and_wake(c.dst)
                await self._reap(c, nursery)
        finally:
            self._circuits.discard(c)
            self.resource_manager.release_connection(c.target)
            _forget(c.src)
            _forget(c.dst)
            logger.debug("relay: circuit %s -> %s ended after %.1f s (%s)", c.source, c.target,
                         trio.current_time() - c.started, c.reason or "closed")

    @staticmethod
    async def _watch(c: _Circuit) -> None:
        """Until both copiers are done or the circuit is cut: enforce its deadlines."""
        while c.reason is None and c.copiers:
            c.wake = trio.Event()
            with trio.move_on_at(c.next_deadline()):
                await c.wake.wait()
                continue
            expired = c.expired(trio.current_time())
            if expired is not None:
                c.cut(expired)

    @staticmethod
    async def _reap(c: _Circuit, nursery: trio.Nursery) -> None:
        """Wait for the copiers; one still blocked after a cut is in a write the peer does not
        take: close that peer's connection (it is wedged), and as a last resort cancel."""
        with trio.move_on_after(STUCK_GRACE):
            await c.done.wait()
            return
        for stream in c.blocked_on:
            if stream is not None:
                logger.warning("relay: closing the connection to %s: a circuit write is stuck", _peer_of(stream))
                await _kill(stream)
        with trio.move_on_after(STUCK_GRACE):
            await c.done.wait()
            return
        nursery.cancel_scope.cancel()

    async def _copy(self, c: _Circuit, direction: int) -> None:
        """Copy one direction of a circuit; on the other side's EOF, pass the half-close on."""
        src, dst = (c.src, c.dst) if direction == 0 else (c.dst, c.src)
        try:
            while c.reason is None:
                c.blocked_on[direction] = src
                try:
                    data = await src.read(RELAY_READ_SIZE)
                except StreamEOF:
                    data = b""
                c.blocked_on[direction] = dst
                if c.reason is not None:
                    return
                if not data:
                    await dst.close()
                    c.eofs += 1
                    c.grace_until = min(c.grace_until, trio.current_time() + HALF_CLOSE_GRACE)
                    return
                left = c.bytes_left[direction]
                if left is not None:
                    if len(data) > left:
                        c.cut("data limit")
                        return
                    c.bytes_left[direction] = left - len(data)
                c.writing_since[direction] = trio.current_time()
                c.poke()  # the watcher takes the write's stall deadline into account
                await dst.write(data)
                c.writing_since[direction] = None
        except Exception as exc:
            c.cut(f"{'source' if direction == 0 else 'target'} side failed: {exc!r}")
        finally:
            c.writing_since[direction] = c.blocked_on[direction] = None
            c.copiers -= 1
            if not c.copiers:
                c.done.set()
            c.poke()

    # -- stop -----------------------------------------------------------------------------------
    async def _handle_stop_stream(self, stream: Any) -> None:  # py-libp2p's handler, bounded, isolated
        try:
            with trio.fail_after(STOP_DEADLINE):
                await super()._handle_stop_stream(stream)
        except Exception as exc:
            logger.debug("relay: stop stream from %s failed: %r", _peer_of(stream), exc)
            await _reset(stream)

    def _cut_all(self, reason: str) -> None:
        for c in list(self._circuits):
            c.cut(reason)


def _peer_of(stream: Any) -> object:
    return getattr(getattr(stream, "muxed_conn", None), "peer_id", "?")


async def serve_relay(libp2p_host: Any, limits: RelayLimits | None = None, *,
                      task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve circuit relay v2 (hop and stop) until cancelled; ``started`` hands back the `Relay`.
    Leaving resets the circuits being relayed."""
    relay = Relay(libp2p_host, limits, allow_hop=True)
    notifee = Notifee(relay._on_conn_event)
    network = libp2p_host.get_network()
    network.register_notifee(notifee)
    try:
        async with background_trio_service(relay):
            await relay.event_started.wait()
            task_status.started(relay)
            await trio.sleep_forever()
    finally:
        network.remove_notifee(notifee)
        relay._cut_all("relay stopping")


async def serve_stop(libp2p_host: Any, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept relayed connections (the STOP protocol) until cancelled. Not with `serve_relay` on
    the same host: that serves STOP too, and each removes the handler when it stops."""
    relay = Relay(libp2p_host, allow_hop=False)
    async with background_trio_service(relay):
        await relay.event_started.wait()
        task_status.started(relay)
        await trio.sleep_forever()
