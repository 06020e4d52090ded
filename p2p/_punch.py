"""Hole punching: py-libp2p's DCUtR, driven the way lamina needs it.

py-libp2p's `DCUtRProtocol` does the protocol (CONNECT with addresses, RTT/2 SYNC, TCP
simultaneous open from our listen port, the Noise role flip) well; what lamina changes:

* **Who starts**: only the peer that dialled through the relay, right after the relayed
  connection opens (`Punch.upgrade`), within one deadline. py-libp2p also runs a loop on every
  peer that starts a punch at any relayed connection every 2 s, so both ends could start at once
  (the spec lets one side start); that loop is off.
* **Which address we give**: py-libp2p predicts `WAN IP : listen port` from identify's observed
  addresses, which lamina turns off (they are ephemeral ports we must never advertise). The
  WAN IP comes from our own dial-back checks instead (`Reachability.observed_ip`), combined with
  our TCP listen ports the same way: a port-preserving NAT maps the punch, which leaves from the
  listen port, to that port. The same checks tell whether our NAT keeps ports
  (`Reachability.port_preserving`); when it does not (a symmetric NAT randomizes them), or we do
  not know our WAN IP, we give no address and start no punch: the prediction would be wrong,
  and the attempt would only cost its dial timeouts. So a punch with a symmetric NAT on either
  side ends within a round trip, and the relayed connection stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol, _local_tcp_listen_addrs

from ._reach import is_public_ip
from ._relay import is_relayed

logger = logging.getLogger("lamina.p2p")

__all__ = ["Punch", "has_direct"]

PUNCH_DEADLINE = 15.0   # the whole upgrade: CONNECT, SYNC, up to 3 dial rounds
PUNCH_DIAL_TIMEOUT = 5  # one simultaneous-open dial (py-libp2p's default: 10 s)
REACH_WAIT = 8.0        # a punch right after start waits this long for our first dial-back check


def has_direct(libp2p_host: Any, peer_id: ID) -> bool:
    return any(not is_relayed(c) for c in libp2p_host.get_network().get_connections(peer_id))


class _DCUtR(DCUtRProtocol):
    """DCUtR with our address prediction and without the background auto-drive loop."""

    def __init__(self, host: Any, predicted: Callable[[], list[str]]) -> None:
        super().__init__(host, dial_timeout=PUNCH_DIAL_TIMEOUT)
        self._predicted = predicted

    async def _auto_drive_loop(self) -> None:
        return None

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        """Our dialer tried the peer's direct addresses before the relay; trying them again
        (identify's private ones included) would only cost dial timeouts."""
        return False

    async def _get_observed_addrs(self) -> list[bytes]:
        return [multiaddr.Multiaddr(a).to_bytes() for a in self._predicted()]

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[multiaddr.Multiaddr],
                                  as_responder: bool = False) -> bool:
        """Dial rounds, only when our own NAT keeps ports: from a NAT that changes them, our
        SYN leaves from a port the peer's NAT has no entry for (py-libp2p's responder side
        would otherwise dial for ~21 s after the initiator gave up)."""
        if not self._predicted():
            return False
        return await super()._perform_hole_punch(peer_id, addrs, as_responder)

    async def _dial_peer(self, peer_id: ID, addr: multiaddr.Multiaddr, source: tuple[str, int] | None = None,
                         as_responder: bool = False) -> None:
        """Public addresses only: py-libp2p adds the peer's identify addresses, its private and
        loopback ones among them, and 127.0.0.1:<port> reaches whatever listens on our own
        machine at that port."""
        ip = next((addr.value_for_protocol(p) for p in ("ip4", "ip6") if p in [x.name for x in addr.protocols()]),
                  None)
        if ip is None or not is_public_ip(ip):
            return
        await super()._dial_peer(peer_id, addr, source, as_responder)


def predict(libp2p_host: Any, wan_ip: str | None, port_preserving: bool | None) -> list[str]:
    """The addresses a hole punch should aim at us: `wan_ip` at each TCP listen port, when our
    NAT keeps ports; none otherwise."""
    if wan_ip is None or port_preserving is not True:
        return []
    family = 6 if ":" in wan_ip else 4
    ports = {port for fam, _ip, port in _local_tcp_listen_addrs(libp2p_host) if fam == family}
    return [f"/ip{family}/{wan_ip}/tcp/{port}" for port in sorted(ports)]


class Punch:
    """DCUtR on one host. `serve` runs it; `upgrade(peer)` tries to turn a relayed connection
    into a direct one. `reach` is our `Reachability` (its `observed_ip`, `port_preserving`)."""

    def __init__(self, libp2p_host: Any, reach: Any) -> None:
        self._host = libp2p_host
        self._reach = reach
        self._dcutr = _DCUtR(libp2p_host, self.predicted)
        self.attempts = 0
        self.successes = 0

    def predicted(self) -> list[str]:
        return predict(self._host, self._reach.observed_ip, self._reach.port_preserving)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(self._dcutr):
            await self._dcutr.event_started.wait()
            task_status.started()
            await trio.sleep_forever()

    async def upgrade(self, peer_id: ID) -> bool:
        """Try to get a direct connection to `peer_id`, to which we hold a relayed one; True when
        we have one. Bounded by `PUNCH_DEADLINE`; never raises (a failed punch leaves the relay)."""
        if has_direct(self._host, peer_id):
            return True
        with trio.move_on_after(REACH_WAIT):   # our WAN IP and NAT type come from the first check
            await self._reach.checked.wait()
        if not self.predicted():
            logger.info("no hole punch to %s: our NAT %s", peer_id, "changes source ports"
                        if self._reach.port_preserving is False else "is not known yet")
            return False
        self.attempts += 1
        ok = False
        with trio.move_on_after(PUNCH_DEADLINE):
            try:
                ok = await self._dcutr.initiate_hole_punch(peer_id)
            except Exception as exc:
                logger.debug("hole punch to %s failed: %r", peer_id, exc)
        ok = ok and has_direct(self._host, peer_id)
        self.successes += ok
        logger.info("hole punch to %s: %s", peer_id, "direct connection" if ok else "failed; staying relayed")
        return ok
