"""NAT traversal on one host: the pieces, started and tied together (`NatTraversal`).

* dial-back checks (`_reach`): are we dialable? what is our WAN IP, does our NAT keep ports?
  Every host with NAT traversal also answers others' checks;
* relay (`_relay`): reachable hosts offer circuit relay v2 (`NatConfig.relay`); every host
  accepts relayed connections (the stop side);
* reservations (`_relay_client.Reservations`): once the checks say we are not dialable, we hold
  slots on `relays_wanted` relays and advertise our circuit addresses instead of our direct
  ones (which nobody outside can dial); the DHT goes to client mode;
* hole punching (`_punch`): after we dial a peer through a relay, DCUtR tries for a direct
  connection at once, before any session opens on the relayed one; a pair that failed is not
  punched again for `PUNCH_RETRY_AFTER`.

Relay candidates come from `set_relay_candidates(fn)` (a node: the reachable servers of its
swarm state) and, always, the bootstrap peers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from ._errors import P2PError, PeerBrokenError
from ._expiring import ExpiringSet
from ._punch import Punch, has_direct
from ._reach import Reachability, ReachStatus, is_public_ip, serve_dialback
from ._relay import RelayLimits, parse_circuit_addr, serve_relay, serve_stop
from ._relay_client import Reservations, dial_circuit

logger = logging.getLogger("lamina.p2p")

__all__ = ["NatConfig", "NatTraversal", "is_circuit"]

PUNCH_RETRY_AFTER = 600.0   # seconds a peer we could not punch to is not tried again
# a peer's circuits are dialled one after another, the next this long after the last began (or
# at once when it failed): a dead or frozen relay first in the list delays the dial this long,
# not a whole dial deadline. A relayed dial takes ~0.1 s in the lab, a second or so on the internet.
CIRCUIT_STAGGER = 1.0
NO_RELAY_WARNING_AFTER = 30.0


@dataclass(frozen=True)
class NatConfig:
    """What a host does about NATs. The default does nothing (plain hosts: tests, tools)."""

    enabled: bool = False          # dial-back checks, reservations when not dialable, hole punching
    relay: bool = False            # offer circuit relay v2 to others (sensible when reachable)
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    reserve: bool = True           # hold relay slots when not dialable (a client need not)
    relays_wanted: int = 2         # relays to hold slots on when not dialable
    hole_punch: bool = True
    reachability: str = "auto"     # "auto" (dial-back checks) | "direct" | "relayed" (forced)

    def __post_init__(self) -> None:
        if self.reachability not in ("auto", ReachStatus.DIRECT, ReachStatus.RELAYED):
            raise ValueError("NatConfig.reachability must be 'auto', 'direct' or 'relayed'")
        if self.relays_wanted < 1:
            raise ValueError("NatConfig.relays_wanted must be >= 1")


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


Candidates = Callable[[], Sequence[tuple[str, Sequence[str]]]]


class NatTraversal:
    """The NAT-traversal services of one `Host` (see the module docstring)."""

    def __init__(self, host: Any, config: NatConfig) -> None:
        self._host = host
        self.config = config
        self.reach: Reachability | None = None
        self.punch: Punch | None = None
        self.reservations: Reservations | None = None
        self.relay: Any = None
        self._extra_candidates: Candidates = lambda: ()
        self._no_punch = ExpiringSet(PUNCH_RETRY_AFTER)
        self._book: dict[ID, dict[str, float]] = {}   # peer -> its circuit addresses -> expiry

    def remember_circuit(self, addr: str, ttl: float) -> None:
        """Keep a peer's circuit address (py-libp2p's peerstore is rewritten by every identify,
        which carries only direct addresses)."""
        target = parse_circuit_addr(addr)[2]
        book = self._book.setdefault(target, {})
        book[addr] = trio.current_time() + ttl
        if len(book) > 16:   # a peer announces a few; keep the freshest
            for old in sorted(book, key=book.__getitem__)[:-16]:
                del book[old]

    def known_circuits(self, peer: ID) -> list[str]:
        now = trio.current_time()
        book = self._book.get(peer, {})
        for addr in [a for a, expiry in book.items() if expiry <= now]:
            del book[addr]
        return list(book)

    # -- what the host asks ------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.config.reachability != "auto":
            return self.config.reachability
        return self.reach.status if self.reach is not None else ReachStatus.UNKNOWN

    def circuits(self) -> list[str]:
        """Our circuit addresses: one through each relay holding a slot for us."""
        return self.reservations.circuit_addrs() if self.reservations is not None else []

    def advertised(self, direct: list[str]) -> list[str]:
        """What we tell peers: our circuit addresses alone once we know nobody can dial us
        (direct addresses would cost every dialer a timeout), else our direct ones."""
        circuits = self.circuits()
        if self.status == ReachStatus.RELAYED and circuits:
            return circuits
        return self._public_addr(direct) + direct + circuits

    def _public_addr(self, direct: list[str]) -> list[str]:
        """The public address a dial-back reached us at, when none of ours says it: a node
        behind a NAT with its port forwarded (and no --announce-addr) is dialable there only."""
        reach = self.reach
        if (reach is None or self.status != ReachStatus.DIRECT or reach.observed_ip is None
                or reach.reached_port is None or not is_public_ip(reach.observed_ip)
                or self._host.config.announce_addrs or any(f"/{reach.observed_ip}/" in a for a in direct)):
            return []
        family = "ip6" if ":" in reach.observed_ip else "ip4"
        return [f"/{family}/{reach.observed_ip}/tcp/{reach.reached_port}/p2p/{self._host.peer_id_str}"]

    def set_relay_candidates(self, fn: Candidates) -> None:
        """Relays to reserve on, best first: (peer id, addresses) pairs."""
        self._extra_candidates = fn
        if self.reservations is not None:
            self.reservations.nudge()

    def _candidates(self) -> list[tuple[str, list[str]]]:
        out: list[tuple[str, list[str]]] = []
        for peer, addrs in self._extra_candidates():
            out.append((str(peer), [a for a in addrs if not is_circuit(a)]))
        for addr in self._host.config.bootstrap_peers:
            ma = multiaddr.Multiaddr(addr)
            out.append((ma.value_for_protocol("p2p"), [addr]))
        return [(p, a) for p, a in out if a]

    async def connect_circuit(self, addr: str) -> ID:
        """Dial through a relay, then (when we can) punch a hole to a direct connection before
        returning: sessions opened next go over the best connection we have."""
        _, _, target = parse_circuit_addr(addr)
        await dial_circuit(self._host.libp2p, addr)
        await self.upgrade(target)
        return target

    async def connect_any(self, peer: ID, circuits: Sequence[str]) -> None:
        """Reach `peer` through the first of `circuits` that works (`connect_circuit`): each dial
        starts `CIRCUIT_STAGGER` s after the one before it, or as soon as that one failed; the
        first to connect wins and the others are cancelled. Raises the last failure when none
        connects."""
        if not circuits:
            raise PeerBrokenError(f"no circuit address known for {peer}", peer_id=peer)
        failures: list[Exception] = []
        async with trio.open_nursery() as nursery:
            for circuit in circuits:
                failed = trio.Event()
                nursery.start_soon(self._try_circuit, peer, circuit, failed, failures, nursery.cancel_scope)
                with trio.move_on_after(CIRCUIT_STAGGER):
                    await failed.wait()
        if len(failures) == len(circuits):   # (the winner cancelled the nursery otherwise)
            raise failures[-1]

    async def _try_circuit(self, peer: ID, circuit: str, failed: trio.Event, failures: list[Exception],
                           done: trio.CancelScope) -> None:
        try:
            await self.connect_circuit(circuit)
        except (P2PError, ValueError) as exc:
            logger.debug("dialling %s through %s failed: %r", peer, circuit, exc)
            failures.append(exc)
            failed.set()
            return
        done.cancel()

    async def upgrade(self, peer: ID) -> bool:
        if self.punch is None or not self.config.hole_punch or peer in self._no_punch:
            return False
        if has_direct(self._host.libp2p, peer):
            return True
        ok = await self.punch.upgrade(peer)
        if not ok and self.punch.predicted():   # tried and failed (not: nothing to try yet)
            self._no_punch.add(peer)
        return ok

    # -- running -------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        h = self._host.libp2p
        async with trio.open_nursery() as nursery:
            serve_dialback(self._host)
            if self.config.relay:
                self.relay = await nursery.start(serve_relay, h, self.config.relay_limits)
            else:
                self.relay = await nursery.start(serve_stop, h)
            if self.config.enabled:
                self.reach = Reachability(self._host, self._listen_ports, self._lane_port)
                if self.config.reachability == "auto":
                    await nursery.start(self.reach.serve)
                self.punch = Punch(h, self.reach)
                await nursery.start(self.punch.serve)
                self.reservations = Reservations(h, self._candidates, want=self.config.relays_wanted)
                nursery.start_soon(self._follow)
            task_status.started()

    def _listen_ports(self) -> list[int]:
        ports = []
        for a in self._host.libp2p.get_addrs():
            text = str(a)
            if "/tcp/" in text and not is_circuit(text):
                port = int(text.split("/tcp/")[1].split("/")[0])
                if port not in ports:
                    ports.append(port)
        return ports

    def _lane_port(self) -> int | None:
        lanes = self._host.lanes
        return lanes.port if lanes is not None else None

    async def _follow(self) -> None:
        """Hold reservations while we are not dialable (and the DHT in client mode); drop them
        when we are."""
        assert self.reach is not None and self.reservations is not None
        async with trio.open_nursery() as nursery:
            holding: trio.CancelScope | None = None
            while True:
                relayed = self.status == ReachStatus.RELAYED
                if relayed and holding is None and self.config.reserve:
                    holding = await nursery.start(_run_in_scope, self.reservations.serve)
                    logger.info("not dialable: reserving slots on %d relays", self.config.relays_wanted)
                    nursery.start_soon(self._warn_without_relay)
                elif not relayed and holding is not None:
                    holding.cancel()
                    holding = None
                await self._set_dht_mode(relayed)
                await self.reach.wait_changed()

    async def _warn_without_relay(self) -> None:
        """Say once, in one sentence, what to do when no relay takes us."""
        await trio.sleep(NO_RELAY_WARNING_AFTER)
        if self.status == ReachStatus.RELAYED and self.reservations is not None and not self.reservations.relays():
            logger.warning("peers cannot dial this host (it is behind a NAT or firewall) and no relay has "
                           "accepted a reservation after %.0f s, so nobody outside its network can reach it: "
                           "give --initial-peers a reachable lamina-bootstrap (it relays), or forward the "
                           "listen port and pass --announce-addr", NO_RELAY_WARNING_AFTER)

    async def _set_dht_mode(self, relayed: bool) -> None:
        dht = self._host.dht
        if dht is None or self._host.config.dht_mode != "auto":
            return
        from libp2p.kad_dht.kad_dht import DHTMode

        wanted = DHTMode.CLIENT if relayed else DHTMode.SERVER
        if self.status != ReachStatus.UNKNOWN and dht.kad.mode is not wanted:
            try:
                await dht.kad.switch_mode(wanted)
                logger.info("DHT mode: %s (we are %s)", dht.mode, self.status)
            except Exception as exc:
                logger.debug("switching the DHT mode failed: %r", exc)


async def _run_in_scope(fn: Callable[..., Any], *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await fn()
