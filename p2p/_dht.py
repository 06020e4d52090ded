"""`DHT`: py-libp2p's Kademlia with the gaps filled in.

What py-libp2p 0.8.1 does not do, and this module does:

* the routing table is not filled from connections: `Host` calls `DHT.seed` for every new
  connection, which adds the peer once identify says it serves the Kademlia protocol (server
  mode);
* `KadDHT.find_providers` returns the local provider cache alone whenever it is non-empty, so a
  node that provides a key itself (or looked it up once) never sees new providers again. Our
  `find_providers` always asks the network and merges the local records;
* provider keys are plain strings mangled by a CID/hex/utf-8 guess; ours are the sha2-256
  multihash of ``lamina/providers/<key>`` so any model name maps to one well-formed key;
* server versus client mode is chosen from reachability (`resolve_dht_mode`).

It also joins the swarm at start (`bootstrap`: dial the bootstrap peers, then look ourselves up
in the background). Nothing here knows the `Host`: it is handed what it needs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import ALPHA, PROTOCOL_ID as KAD_PROTOCOL_ID, QUERY_TIMEOUT
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from ._constants import BOOTSTRAP_DEADLINE, DHT_PROVIDER_NAMESPACE, DHT_QUERY_DEADLINE, IDENTIFY_WAIT
from ._errors import P2PError

logger = logging.getLogger("lamina.p2p")

DhtModeName = Literal["auto", "server", "client"]

__all__ = ["DHT", "PeerRecord", "resolve_dht_mode", "provider_key", "bootstrap", "refresh", "KAD_PROTOCOL_ID"]


@dataclass(frozen=True)
class PeerRecord:
    """A peer id and the multiaddrs (strings, without /p2p) it can be reached at."""

    peer_id: ID
    addrs: tuple[str, ...]

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    def full_addrs(self) -> list[str]:
        """The addrs with ``/p2p/<id>`` appended, ready for `Host.connect`."""
        return [a if "/p2p/" in a else f"{a}/p2p/{self.peer_id_str}" for a in self.addrs]


def _record(info: PeerInfo) -> PeerRecord:
    addrs = []
    for a in info.addrs:
        text = str(a)
        cut = text.find("/p2p/")
        addrs.append(text[:cut] if cut >= 0 else text)
    return PeerRecord(info.peer_id, tuple(dict.fromkeys(addrs)))


def provider_key(key: str) -> str:
    """The DHT key (hex multihash) under which providers of `key` (e.g. a model name) are kept."""
    digest = hashlib.sha256(DHT_PROVIDER_NAMESPACE + key.encode("utf-8")).digest()
    return (b"\x12\x20" + digest).hex()  # sha2-256 multihash


def _is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_global


def resolve_dht_mode(mode: DhtModeName, our_ips: Iterable[str], bootstrap_ips: Iterable[str], announced: bool) -> DHTMode:
    """Server or client, as a pure function of what we know about reachability.

    "auto" means server when peers can be expected to dial us: when we announce addresses, when
    we have a public address, or when the swarm we join is itself local (loopback or private
    bootstrap peers: a single machine or a LAN). A node with only private addresses joining a
    swarm through public bootstrap peers is probably behind NAT: client. py-libp2p's AutoNAT is
    not used because it reports unreachable addresses as public.
    """
    if mode == "server":
        return DHTMode.SERVER
    if mode == "client":
        return DHTMode.CLIENT
    if mode != "auto":
        raise ValueError(f"dht_mode must be 'auto', 'server' or 'client', not {mode!r}")
    ours = list(our_ips)
    boots = list(bootstrap_ips)
    if announced or any(_is_public(ip) for ip in ours):
        return DHTMode.SERVER
    if not boots or not any(_is_public(ip) for ip in boots):
        return DHTMode.SERVER
    return DHTMode.CLIENT


class DHT:
    """Kademlia over the host: provider records keyed by model, peer address lookup."""

    def __init__(self, libp2p_host, mode: DHTMode) -> None:  # type: ignore[no-untyped-def]
        self._host = libp2p_host
        self.kad = KadDHT(libp2p_host, mode, enable_random_walk=False)

    @property
    def mode(self) -> str:
        return "server" if self.kad.mode is DHTMode.SERVER else "client"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.kad):
            task_status.started()
            await trio.sleep_forever()

    # -- routing table ---------------------------------------------------------------------
    async def add_peer(self, peer_id: ID) -> bool:
        """Add a connected, identified peer to the routing table if it is a DHT server."""
        protocols = self._host.get_peerstore().get_protocols(peer_id) or []
        if str(KAD_PROTOCOL_ID) not in protocols:
            return False
        return await self.kad.add_peer(peer_id)

    async def seed(self, peer_id: ID) -> None:
        """`add_peer` for a new connection: py-libp2p never adds connected peers to the routing
        table. Wait (up to `IDENTIFY_WAIT`) for identify to say whether the peer is a DHT
        server, then add it; give up if it disconnects meanwhile."""
        peerstore = self._host.get_peerstore()
        with trio.move_on_after(IDENTIFY_WAIT):
            while True:
                try:
                    if peerstore.get_protocols(peer_id):
                        break
                except Exception:
                    pass
                if not self._host.get_network().get_connections(peer_id):
                    return
                await trio.sleep(0.02)  # identify has no completion event to wait on
            try:
                await self.add_peer(peer_id)
            except Exception as exc:
                logger.debug("could not add %s to the routing table: %r", peer_id, exc)

    def routing_table_peers(self) -> list[ID]:
        return list(self.kad.routing_table.get_peer_ids())

    async def refresh(self) -> None:
        """Look ourselves up to learn the peers closest to us (fills the routing table)."""
        await self.kad.peer_routing.refresh_routing_table()

    # -- providers -------------------------------------------------------------------------
    async def provide(self, key: str) -> bool:
        """Announce that we provide `key`. True when at least one other peer stored the record
        (False in a swarm of one: the record is still kept locally and served)."""
        return await self.kad.provide(provider_key(key))

    async def find_providers(self, key: str, count: int = 20) -> list[PeerRecord]:
        """Providers of `key`, from the network and the local store (including ourselves)."""
        raw = bytes.fromhex(provider_key(key))
        store = self.kad.provider_store
        found: dict[ID, PeerInfo] = {p.peer_id: p for p in store.get_providers(raw)}
        local_id = self._host.get_id()
        candidates = list(await self.kad.peer_routing.find_closest_peers_network(raw))
        queried: set[ID] = {local_id}
        while candidates and len(found) < count + 1:
            batch = [p for p in candidates[:ALPHA] if p not in queried]
            candidates = candidates[ALPHA:]
            closer: list[ID] = []

            async def ask(peer: ID) -> None:
                queried.add(peer)
                with trio.move_on_after(QUERY_TIMEOUT):
                    try:
                        providers, nearer = await store._get_providers_from_peer_with_closers(peer, raw)
                    except Exception as exc:  # one unhelpful peer must not fail the lookup
                        logger.debug("GET_PROVIDERS to %s failed: %r", peer, exc)
                        return
                    for info in providers:
                        found.setdefault(info.peer_id, info)
                        store.add_provider(raw, info)
                    closer.extend(nearer)

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            fresh = [p for p in dict.fromkeys(closer) if p not in queried and p not in candidates]
            if fresh:
                candidates = sort_peer_ids_by_distance(raw, candidates + fresh)
        return [_record(info) for info in list(found.values())[:count]]

    # -- peers -----------------------------------------------------------------------------
    async def find_peer(self, peer_id: ID | str) -> list[str]:
        """Multiaddrs (without /p2p) of `peer_id`: routing table, peerstore, then the network.
        Empty when nobody knows the peer."""
        pid = peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)
        info = await self.kad.find_peer(pid)
        if info is None:
            return []
        return list(_record(info).addrs)


async def bootstrap(addrs: list[str], connect: Callable[[str], Awaitable[object]], dht: DHT | None,
                    nursery: trio.Nursery) -> dict[str, P2PError]:
    """Dial the bootstrap peers `addrs` with `connect` (concurrently; failures are logged and
    returned, by address) and, with a `dht`, look ourselves up so the routing table learns the
    swarm: the lookup runs in `nursery`, in the background."""
    failed: dict[str, P2PError] = {}
    if not addrs:
        return failed
    connected = 0

    async def dial(addr: str) -> None:
        nonlocal connected
        try:
            await connect(addr)
            connected += 1
        except P2PError as exc:
            failed[addr] = exc
            logger.warning("bootstrap peer %s unreachable: %s", addr, exc)

    with trio.move_on_after(BOOTSTRAP_DEADLINE):
        async with trio.open_nursery() as dials:
            for addr in addrs:
                dials.start_soon(dial, addr)
        if connected and dht is not None:
            # the routing table is seeded (`DHT.seed`) once identify completes; wait for it
            with trio.move_on_after(IDENTIFY_WAIT):
                while not dht.routing_table_peers():
                    await trio.sleep(0.02)
    if not connected:
        logger.warning("no bootstrap peer reachable")
    elif dht is not None:
        # In the background: the lookup asks peers it learns of, and one that does not answer
        # (a frozen process, a sleeping laptop) held the host's start for the whole deadline.
        nursery.start_soon(refresh, dht)
    return failed


async def refresh(dht: DHT) -> None:
    """Look ourselves up (`DHT.refresh`) within `DHT_QUERY_DEADLINE`; failures are logged."""
    with trio.move_on_after(DHT_QUERY_DEADLINE):
        try:
            await dht.refresh()
        except Exception as exc:  # py-libp2p raises assorted errors; a lookup must not kill the host
            logger.warning("DHT bootstrap lookup failed: %r", exc)
