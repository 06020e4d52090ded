"""Circuit relay v2, client side: dialling a circuit address, and keeping reservations on
relays so that we can be dialled through them (the relay and stop sides are `_relay`).

* `dial_circuit(h, "/ip4/R/tcp/P/p2p/RID/p2p-circuit/p2p/TARGET")` opens a relayed connection
  and adds it to the swarm, so that ``h.new_stream(TARGET, ...)`` (and our `Host.request` /
  `open_session` by peer id) use it. py-libp2p's ``connect`` silently skips circuit addresses,
  and its `CircuitV2Transport` makes a reservation on every dial with its default config, and
  does not protect the relayed connection with the private-network key (inbound ones are);
  this sends only CONNECT, and wraps the connection with the key before the upgrade;
* `reserve(h, relay, addrs)`: one reservation; `Reservations`: a service that keeps
  reservations on `want` relays and says which circuit addresses to advertise.

A relay that dies silently (frozen, its machine gone, packets dropped: no FIN, no RST) is never
noticed by py-libp2p, so `Reservations` pings each relay it holds (``/ipfs/ping/1.0.0``, served by
every py-libp2p host) every `RELAY_PING_INTERVAL`. A ping unanswered after `RELAY_PING_DEADLINE`
is a miss, and a second ping goes out at once on a fresh stream; an answer to either within
another deadline clears it (a slow relay, a lost stream), `RELAY_PING_MISSES` misses in a row
mean the relay is dead: its reservation is dropped, our connection to it closed, it is backed
off, and another candidate is reserved at once. A relay frozen at a random moment is thus
dropped 6.25 to 10.25 s later (and replaced within milliseconds when a candidate answers),
while a live one is let go only if neither of two pings is answered within 6 s, plus a grace
for a stall of our own event loop. The pings are tasks of their own, never cancelled mid-way
but by the service stopping (then their stream is reset); the watcher only waits on them.

Everything takes the py-libp2p host (``host.libp2p``), never our `Host`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import libp2p.network.swarm as _swarm_module
import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from ._constants import DIAL_DEADLINE, RESET_DEADLINE
from ._errors import PeerBrokenError, PeerTimeoutError
from ._libp2p import Notifee, unsupported
from ._relay import HOP_PROTOCOL_ID, _close, _reset, _strip_p2p, circuit_addr, parse_circuit_addr

logger = logging.getLogger("lamina.p2p")

__all__ = ["RelayRefusedError", "dial_circuit", "reserve", "Reservations"]

CIRCUIT_DIAL_DEADLINE = DIAL_DEADLINE + 10.0  # connect to the relay + CONNECT + upgrade
RESERVE_DEADLINE = DIAL_DEADLINE + 5.0  # connect to the relay + RESERVE
RENEW_FRACTION = 0.5  # renew a reservation when this fraction of its TTL is left
MIN_RENEW_DELAY = 1.0
BACKOFF_MIN = 5.0  # a candidate that failed or refused is skipped this long, doubling per failure
BACKOFF_MAX = 60.0  # candidates are few, a retry costs one dial: a returning relay is used within a minute
FLAP_WINDOW = 30.0  # a reservation lost sooner than this after it was made backs its relay off
RECHECK_INTERVAL = 15.0  # below `want`, candidates() is asked again at least this often
RELAY_PING_INTERVAL = 4.0  # each held relay is pinged this long after its last check ended
RELAY_PING_DEADLINE = 3.0  # a ping unanswered this long is a miss (and another ping goes out)
RELAY_PING_MISSES = 2  # misses in a row that declare the relay dead (silent for 2 x 3 s)
PING_GRACE = 0.25  # after a deadline, let in an answer our own stalled event loop has not read yet
PING_GIVEUP = 10.0  # a ping stream still unanswered this long is reset


class RelayRefusedError(PeerBrokenError):
    """The relay answered with a status other than OK (`status`: a circuit v2 `StatusCode`), or
    does not serve the hop protocol (`status` is None)."""

    def __init__(self, message: str, *, status: int | None, peer_id: object | None = None) -> None:
        super().__init__(message, peer_id=peer_id)
        self.status = status


# --- dialling ----------------------------------------------------------------------------------
async def _hop_exchange(libp2p_host: Any, relay_id: ID, request: HopMessage) -> tuple[Any, HopMessage]:
    """Open a hop stream on our connection to the relay, send `request`, read the answer.
    Returns the stream (open) and the answer; resets the stream and raises on failure."""
    try:
        stream = await libp2p_host.new_stream(relay_id, [HOP_PROTOCOL_ID])
    except Exception as exc:
        if unsupported(exc):
            raise RelayRefusedError(f"{relay_id} is not a relay", status=None, peer_id=relay_id) from exc
        raise PeerBrokenError(f"cannot open a hop stream to {relay_id}: {exc}", peer_id=relay_id) from exc
    try:
        await write_delimited_msg(stream, request)
        reply = await read_delimited_msg(stream, HopMessage)
    except BaseException as exc:
        await _reset(stream)
        if isinstance(exc, Exception):
            raise PeerBrokenError(f"hop exchange with {relay_id} failed: {exc!r}", peer_id=relay_id) from exc
        raise
    status = reply.status if reply.HasField("status") else StatusCode.UNUSED
    if reply.type != HopMessage.STATUS or status != StatusCode.OK:
        await _reset(stream)
        name = StatusCode(status).name if status in StatusCode._value2member_map_ else str(status)
        raise RelayRefusedError(f"relay {relay_id} refused: {name}", status=status, peer_id=relay_id)
    return stream, reply


async def _connect_relay(libp2p_host: Any, relay_id: ID, addrs: Sequence[multiaddr.Multiaddr]) -> None:
    network = libp2p_host.get_network()
    if network.connections.get(relay_id):
        return
    # py-libp2p refuses to redial a peer for 60 s after a failed dial; the backoff here decides
    # when to try a relay again (a restarted bootstrap waited ~75 s for its slots otherwise)
    unblock = getattr(network, "unblock_peer", None)
    if unblock is not None:
        unblock(relay_id)
    try:
        await libp2p_host.connect(PeerInfo(relay_id, list(addrs)))
    except Exception as exc:
        raise PeerBrokenError(f"cannot connect to relay {relay_id}: {exc}", peer_id=relay_id) from exc


async def dial_circuit(libp2p_host: Any, addr: str | multiaddr.Multiaddr) -> Any:
    """Open a connection to the target of circuit address `addr` through its relay (dialling the
    relay if needed) and add it to the swarm, so that ``new_stream(target, ...)`` uses it; returns
    the swarm connection. It leaves the swarm when the circuit dies, like any connection.

    Raises ValueError (not a circuit address), `RelayRefusedError` (e.g. ``NO_RESERVATION``:
    the target holds no slot there), `PeerBrokenError`, `PeerTimeoutError`."""
    relay_addr, relay_id, target_id = parse_circuit_addr(addr)
    if target_id == libp2p_host.get_id():
        raise ValueError(f"{addr} is our own circuit address")
    full = multiaddr.Multiaddr(circuit_addr(relay_addr, relay_id, target_id))
    stream, conn = None, None
    try:
        with trio.fail_after(CIRCUIT_DIAL_DEADLINE):
            await _connect_relay(libp2p_host, relay_id, [relay_addr])
            connect = HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=target_id.to_bytes()))
            stream, _ = await _hop_exchange(libp2p_host, relay_id, connect)
            raw: Any = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                     addresses=[full])
            psk = getattr(libp2p_host.get_network(), "psk", None)
            if psk is not None:  # as the swarm does for inbound ones; looked up now: it may be replaced
                raw = _swarm_module.new_protected_conn(raw, psk)
            conn = await libp2p_host.upgrade_outbound_connection(raw, target_id)
    except trio.TooSlowError:
        raise PeerTimeoutError(f"dialling {target_id} through {relay_id} took more than {CIRCUIT_DIAL_DEADLINE}s",
                               peer_id=target_id) from None
    except PeerBrokenError:
        raise
    except Exception as exc:
        raise PeerBrokenError(f"cannot reach {target_id} through {relay_id}: {exc}", peer_id=target_id) from exc
    finally:
        if conn is None:
            await _reset(stream)
    try:  # a protected connection hides the relayed type from the swarm: say it
        conn.set_transport_info([full], ConnectionType.RELAYED)
    except Exception:
        pass
    return conn


# --- reservations (client side) ------------------------------------------------------------------
async def reserve(libp2p_host: Any, relay_id: ID, addrs: Sequence[multiaddr.Multiaddr | str]) -> int:
    """Make or renew our reservation on `relay_id` (dialling it at `addrs` if not connected);
    returns its expiry (unix seconds). Raises `RelayRefusedError` (no slot, not a relay),
    `PeerBrokenError`, `PeerTimeoutError`. `Reservations` keeps them up by itself."""
    try:
        with trio.fail_after(RESERVE_DEADLINE):
            await _connect_relay(libp2p_host, relay_id, [_strip_p2p(a) for a in addrs])
            stream, reply = await _hop_exchange(libp2p_host, relay_id, HopMessage(type=HopMessage.RESERVE))
            await _close(stream)
    except trio.TooSlowError:
        raise PeerTimeoutError(f"reserving on {relay_id} took more than {RESERVE_DEADLINE}s",
                               peer_id=relay_id) from None
    expire = int(reply.reservation.expire) if reply.HasField("reservation") else 0
    if expire <= time.time():
        raise RelayRefusedError(f"relay {relay_id} granted no reservation time", status=reply.status, peer_id=relay_id)
    return expire


Candidates = Callable[[], Sequence[tuple[ID | str, Sequence[multiaddr.Multiaddr | str]]]]


@dataclass
class _Held:
    relay: ID
    addr: multiaddr.Multiaddr  # the relay's transport address we reached it at (no /p2p)
    expire: int  # unix seconds, as the relay said
    renew_at: float  # trio time
    since: float  # trio time


class Reservations:
    """Keep reservations on at least `want` distinct relays from `candidates()` (peer id and
    transport addresses, in order of preference: e.g. reachable nodes offering relay, bootstrap
    peers), renewed at half their TTL; when a relay's connection closes, a renewal fails or the
    relay stops answering pings (every `ping_interval` s, dead after `RELAY_PING_MISSES` misses
    of `ping_deadline` s: see the module docstring), take another candidate at once (woken by
    the swarm's disconnect event, or by the ping). Candidates that fail or refuse (no slot, no
    hop) are skipped with exponential backoff, and so is a relay found dead.

        reservations = Reservations(host.libp2p, candidates)
        await nursery.start(reservations.serve)
        addrs = reservations.circuit_addrs(); await reservations.wait_changed()

    Call `nudge()` when the candidates change, to look again before `RECHECK_INTERVAL`."""

    def __init__(self, libp2p_host: Any, candidates: Candidates, *, want: int = 2,
                 ping_interval: float = RELAY_PING_INTERVAL, ping_deadline: float = RELAY_PING_DEADLINE) -> None:
        if want < 1:
            raise ValueError("want must be >= 1")
        if ping_interval <= 0 or ping_deadline <= 0:
            raise ValueError("ping_interval and ping_deadline must be > 0")
        self._host = libp2p_host
        self._candidates = candidates
        self.want = want
        self.ping_interval, self.ping_deadline = ping_interval, ping_deadline
        self._nursery: trio.Nursery | None = None  # the service's: relay watchers and their pings
        self._held: dict[ID, _Held] = {}
        self._backoff: dict[ID, tuple[float, float]] = {}  # relay -> (until, delay), trio time
        self._wake = trio.Event()
        self._changed = trio.Event()

    # -- what callers read ----------------------------------------------------------------------
    def relays(self) -> list[ID]:
        return list(self._held)

    def circuit_addrs(self) -> list[str]:
        """Our circuit address through each relay holding a slot for us."""
        me = self._host.get_id()
        return [circuit_addr(h.addr, h.relay, me) for h in self._held.values()]

    async def wait_changed(self) -> None:
        """Return at the next change of `relays()` / `circuit_addrs()`."""
        await self._changed.wait()

    def nudge(self) -> None:
        self._wake.set()

    def backing_off(self) -> list[ID]:
        now = trio.current_time()
        return [peer for peer, (until, _) in self._backoff.items() if until > now]

    # -- the service ----------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        network = self._host.get_network()
        notifee = Notifee(self._on_conn_event)
        network.register_notifee(notifee)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    await self._renew_due()
                    await self._fill()
                    with trio.move_on_at(self._next_wakeup()):
                        await self._wake.wait()
        finally:
            self._nursery = None
            network.remove_notifee(notifee)

    def _on_conn_event(self, conn: Any, *, connected: bool) -> None:
        peer = getattr(getattr(conn, "muxed_conn", None), "peer_id", None)
        if not connected and peer in self._held and not self._connected(peer):
            self._drop(peer, "connection closed")
            self._wake.set()

    def _connected(self, peer: ID) -> bool:
        return bool(self._host.get_network().connections.get(peer))

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _drop(self, relay: ID, why: str, *, back_off: bool = False) -> None:
        held = self._held.pop(relay, None)
        if held is None:
            return
        if back_off or trio.current_time() - held.since < FLAP_WINDOW:
            self._back_off(relay)
        logger.info("relay reservation on %s lost (%s); %d of %d held", relay, why, len(self._held), self.want)
        self._changed_now()

    def _back_off(self, relay: ID) -> None:
        _, delay = self._backoff.get(relay, (0.0, 0.0))
        delay = min(max(delay * 2, BACKOFF_MIN), BACKOFF_MAX)
        self._backoff[relay] = (trio.current_time() + delay, delay)

    def _next_wakeup(self) -> float:
        times = [h.renew_at for h in self._held.values()]
        if len(self._held) < self.want:
            now = trio.current_time()
            times.append(now + RECHECK_INTERVAL)
            times += [until for until, _ in self._backoff.values() if until > now]
        return min(times, default=float("inf"))

    def _pick(self) -> list[tuple[ID, list[multiaddr.Multiaddr]]]:
        try:
            offered = list(self._candidates())
        except Exception:
            logger.exception("relay candidates() failed")
            return []
        me, now, picks, seen = self._host.get_id(), trio.current_time(), [], set()
        for peer, addrs in offered:
            try:
                peer_id = peer if isinstance(peer, ID) else ID.from_base58(str(peer))
                parsed = [_strip_p2p(a) for a in addrs]
            except Exception as exc:
                logger.debug("relay candidate %r skipped: %r", peer, exc)
                continue
            if (peer_id == me or peer_id in self._held or peer_id in seen or not parsed
                    or self._backoff.get(peer_id, (0.0, 0.0))[0] > now):
                continue
            seen.add(peer_id)
            picks.append((peer_id, parsed))
        return picks

    async def _fill(self) -> None:
        picks = self._pick() if len(self._held) < self.want else []
        while picks and len(self._held) < self.want:
            missing = self.want - len(self._held)
            batch, picks = picks[:missing], picks[missing:]
            async with trio.open_nursery() as nursery:  # at once: a dead candidate costs a dial timeout
                for relay, addrs in batch:
                    nursery.start_soon(self._take, relay, addrs)

    async def _take(self, relay: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        started = trio.current_time()
        try:
            held = await self._reserve(relay, addrs)
        except Exception as exc:  # whatever a candidate does, the service goes on
            self._back_off(relay)
            logger.debug("relay candidate %s skipped for %.0f s: %r", relay, self._backoff[relay][1], exc,
                         exc_info=not isinstance(exc, (PeerBrokenError, PeerTimeoutError)))
            return
        if not self._connected(relay):  # closed while we were at it (the event may have passed)
            self._back_off(relay)
            return
        self._held[relay] = held
        self._backoff.pop(relay, None)
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, held)
        logger.info("relay reservation on %s at %s in %.0f ms, %d s left; %d of %d held", relay, held.addr,
                    1000 * (trio.current_time() - started), held.expire - time.time(), len(self._held), self.want)
        self._changed_now()

    async def _reserve(self, relay: ID, addrs: list[multiaddr.Multiaddr]) -> _Held:
        expire = await reserve(self._host, relay, addrs)
        now, ttl = trio.current_time(), expire - time.time()
        renew_at = now + max(MIN_RENEW_DELAY, ttl * RENEW_FRACTION)
        return _Held(relay, self._dialled_addr(relay, addrs), expire, renew_at, now)

    def _dialled_addr(self, relay: ID, addrs: list[multiaddr.Multiaddr]) -> multiaddr.Multiaddr:
        """The candidate address our connection to the relay runs to, else the first one (a
        connection the relay dialled comes from a port nobody can dial)."""
        used = set()
        for conn in self._host.get_network().connections.get(relay) or []:
            try:
                used |= {str(a) for a in conn.get_transport_addresses()}
            except Exception:
                continue
        return next((a for a in addrs if str(a) in used), addrs[0])

    async def _renew_due(self) -> None:
        now = trio.current_time()
        for relay in [r for r, h in self._held.items() if h.renew_at <= now]:
            held = self._held[relay]
            try:
                fresh = await self._reserve(relay, [held.addr])
            except Exception as exc:
                self._drop(relay, f"renewal failed: {exc}", back_off=True)
                continue
            if self._held.get(relay) is held:
                held.expire, held.renew_at = fresh.expire, fresh.renew_at
                logger.debug("relay reservation on %s renewed, %d s left", relay, fresh.expire - time.time())

    # -- liveness: a relay that dies silently ------------------------------------------------------
    async def _watch(self, held: _Held) -> None:
        """Ping `held.relay` while this reservation is held; when it stops answering, drop it,
        back it off, wake the fill loop, and close our connection to it. No I/O here: the pings
        run in tasks of their own (`_ping`), which nothing cancels but the service stopping."""
        relay = held.relay
        while True:
            await trio.sleep(self.ping_interval)
            if self._held.get(relay) is not held:
                return
            started = trio.current_time()
            if await self._answers(relay):
                continue
            if self._held.get(relay) is not held:  # dropped meanwhile (disconnected, renewal failed)
                return
            silent = trio.current_time() - started
            self._drop(relay, f"not answering pings for {silent:.1f} s", back_off=True)
            self._wake.set()
            await self._disconnect(relay)
            return

    async def _answers(self, relay: ID) -> bool:
        """Whether `relay` answers a ping: a miss (no answer within the deadline) sends another
        ping at once, on a fresh stream; an answer to any of them counts."""
        answered = trio.Event()
        for _ in range(RELAY_PING_MISSES):
            assert self._nursery is not None
            self._nursery.start_soon(self._ping, relay, answered)
            with trio.move_on_after(self.ping_deadline):
                await answered.wait()
            if answered.is_set():
                return True
            logger.debug("relay %s did not answer a ping within %.1f s", relay, self.ping_deadline)
        # after a stall of our own event loop, the deadline and the answer come due together
        with trio.move_on_after(PING_GRACE):
            await answered.wait()
        return answered.is_set()

    async def _ping(self, relay: ID, answered: trio.Event) -> None:
        """One ping on a new stream; sets `answered` on the pong, or on the relay refusing the
        protocol (alive all the same). A stream left mid-way (give-up, cancellation) is reset."""
        if not self._connected(relay):  # new_stream would dial it again: the disconnect event will drop it
            return
        stream = None
        try:
            with trio.move_on_after(PING_GIVEUP):
                stream = await self._host.new_stream(relay, [PING_PROTOCOL_ID])
                await perform_ping_roundtrip(stream)
                answered.set()
                await _close(stream)
                stream = None
        except Exception as exc:
            if unsupported(exc):
                answered.set()
            else:
                logger.debug("ping to relay %s failed: %r", relay, exc)
        finally:
            await _reset(stream)

    async def _disconnect(self, relay: ID) -> None:
        """Close our connections to a dead relay, bounded and shielded: the transport first
        (yamux's own close writes a GO_AWAY frame, which can block on a frozen peer), then the
        swarm's, which removes it and tells the notifees."""
        conns = list(self._host.get_network().connections.get(relay) or [])
        with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
            for conn in conns:
                secured = getattr(getattr(conn, "muxed_conn", None), "secured_conn", None)
                for close in ([secured.close] if secured is not None else []) + [conn.close]:
                    try:
                        await close()
                    except Exception as exc:
                        logger.debug("closing our connection to relay %s: %r", relay, exc)
