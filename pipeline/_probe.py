"""Reaching and probing a server by peer id: the client's small questions to a node.

* `learn_addrs`: put a server's announced addresses (direct ones, and circuit addresses through
  each relay holding a slot for it) into our host's book, so that a dial by peer id can use any
  of them. A node behind a NAT changes relays when one dies: a redial must use the addresses of
  its latest record, not those of the record the route was chosen from.
* `connect`: dial a hop of a route.
* `answers`: is the node alive, ONLINE, serving our model and blocks? One InfoRequest within
  `PROBE_TIMEOUT`. When it does not answer (an error frame is an answer), our relayed
  connections to it are closed: a relay that froze or vanished leaves its circuits in the
  swarm, silent, and every new stream to the node would go to one of them; the next probe then
  dials afresh through the node's relays.
* `round_trip_ms`: one InfoRequest, timed, for the router's per-server RTTs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

import p2p

from .protocol import INFO_PROTOCOL, ONLINE, InfoRequest, NodeInfo
from ._routing import Hop

log = logging.getLogger("lamina.client")

PROBE_TIMEOUT = 3.0  # a node whose session ended must answer an InfoRequest within this to be kept


def learn_addrs(host: p2p.Host, peer: str, addrs: Iterable[str]) -> None:
    try:   # all of them: a later redial (a liveness probe) may need another relay's circuit
        host.add_addrs(peer, list(addrs))
    except p2p.P2PError:
        pass


async def connect(host: p2p.Host, hop: Hop) -> None:
    """Connect to `hop`'s node at the first of its addresses that works (its addresses are
    learnt first); failures are left to the stream that follows."""
    learn_addrs(host, hop.peer_id, hop.addrs)
    for addr in hop.addrs:
        try:
            await host.connect(addr)
            return
        except (p2p.P2PError, OSError, ValueError):
            continue


async def answers(host: p2p.Host, peer: str, model_hash: str, start: int, end: int) -> bool:
    """Whether `peer` answers an InfoRequest within PROBE_TIMEOUT, ONLINE, serving the model
    `model_hash` and blocks [start, end)."""
    reply = None
    with trio.move_on_after(PROBE_TIMEOUT) as scope:
        try:
            reply = await host.request(peer, INFO_PROTOCOL, InfoRequest())
        except p2p.RemoteError as e:   # an error frame (BUSY, say): its connection works
            log.info("node %s answers with an error (%s)", peer, e)
            return False
        except (p2p.P2PError, OSError) as e:
            log.info("node %s does not answer (%s)", peer, e)
    if reply is None:
        if scope.cancelled_caught:
            log.info("node %s does not answer within %.0f s", peer, PROBE_TIMEOUT)
        await host.drop_relayed(peer)   # its relay may be what died, silently
        return False
    return (isinstance(reply, NodeInfo) and reply.model == model_hash and reply.state == ONLINE
            and reply.start <= start and end <= reply.end)


async def round_trip_ms(host: p2p.Host, peer: str) -> float | None:
    """One InfoRequest round trip to `peer` in ms, over the connection steps will take (a
    relay's detour included); None when it does not answer within PROBE_TIMEOUT."""
    started = trio.current_time()
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            await host.request(peer, INFO_PROTOCOL, InfoRequest())
        except (p2p.P2PError, OSError):
            return None
        return 1000 * (trio.current_time() - started)
    return None
