"""Reachability by dial-back: can peers open a fresh connection to us?

py-libp2p's AutoNAT answers "reachable" without dialing (it reuses the connection the request
came on), so lamina asks its own question, on `/lamina/dialback/1`:

* the prober sends `DialBackRequest(ports, lane_port)`: the TCP ports it listens on;
* the checker dials the IP it sees the request come from (never another IP: a checker must not
  be usable to make us dial third parties) at each port, on a **fresh** TCP connection, and for
  a libp2p port completes the security handshake (Noise, after the private-network protector
  when the swarm has a key), which proves that the prober itself answered there; a lane port is
  reached when a TCP connection opens. It answers `DialBackResult` with the IP it saw, the port
  that answered and whether the lane port did.

The prober (`Reachability`, a trio service) asks up to `CHECKERS` connected peers (peers at
public addresses first: a LAN neighbour reaching us says nothing about the internet), at start,
when its connections change from none to some, when a checker reports another observed IP (our
address changed), and every `RECHECK_INTERVAL`. One success makes us DIRECT; `FAILURES_NEEDED`
checkers failing (and none succeeding) make us RELAYED; no answer leaves the status as it was.
The observed public IP is kept: with a port-preserving NAT, `observed_ip:listen_port` is the
address a hole punch aims at.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from ._errors import P2PError, RemoteError
from ._messages import Message, field, message
from ._relay import is_relayed

logger = logging.getLogger("lamina.p2p")

__all__ = ["DIALBACK_PROTOCOL", "DialBackRequest", "DialBackResult", "Reachability", "ReachStatus",
           "serve_dialback", "dial_back", "is_public_ip"]

DIALBACK_PROTOCOL = "/lamina/dialback/1"
DIALBACK_DEADLINE = 3.0     # the checker's dial of one port (connect + handshake)
REQUEST_DEADLINE = 10.0     # the prober's wait for one checker's answer
CHECKERS = 3                # peers asked per check
FAILURES_NEEDED = 2         # checkers that must fail before we call ourselves unreachable
RECHECK_INTERVAL = 300.0
MAX_PORTS = 4


class ReachStatus:
    UNKNOWN = "unknown"
    DIRECT = "direct"
    RELAYED = "relayed"


@message("p2p.dialback.request", _reserved=True)
@dataclass(frozen=True)
class DialBackRequest(Message):
    ports: tuple[int, ...] = field(min_len=1, max_len=MAX_PORTS)
    lane_port: int | None = field(default=None, min_value=1, max_value=65535)

    def validate(self) -> None:
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not in [1, 65535]")


@message("p2p.dialback.result", _reserved=True)
@dataclass(frozen=True)
class DialBackResult(Message):
    observed_ip: str = field(max_len=64)
    reached_port: int | None = field(default=None, min_value=1, max_value=65535)
    lane_reached: bool = False
    observed_port: int | None = field(default=None, min_value=1, max_value=65535)


def is_public_ip(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def remote_endpoint(libp2p_host: Any, peer_id: ID) -> tuple[str, int] | None:
    """The (IP, port) of our direct connection to `peer_id` (None when relayed or not connected)."""
    for conn in libp2p_host.get_network().get_connections(peer_id):
        muxed = getattr(conn, "muxed_conn", conn)
        if is_relayed(muxed):
            continue
        try:
            remote = muxed.get_remote_address()
        except Exception:
            continue
        if remote:
            return str(remote[0]), int(remote[1])
    return None


def remote_ip(libp2p_host: Any, peer_id: ID) -> str | None:
    endpoint = remote_endpoint(libp2p_host, peer_id)
    return endpoint[0] if endpoint else None


def local_port(libp2p_host: Any, peer_id: ID) -> int | None:
    """Our local TCP port on the direct connection to `peer_id`: the socket under py-libp2p's
    layers (yamux, Noise, the private-network protector, the raw connection)."""
    for conn in libp2p_host.get_network().get_connections(peer_id):
        layer: Any = getattr(conn, "muxed_conn", conn)
        for _ in range(12):
            sock = getattr(layer, "socket", None)
            if sock is not None and hasattr(sock, "getsockname"):
                try:
                    return int(sock.getsockname()[1])
                except (OSError, IndexError, TypeError):
                    break
            layer = next((getattr(layer, a) for a in ("secured_conn", "conn", "_conn", "read_writer", "stream")
                          if getattr(layer, a, None) is not None), None)
            if layer is None:
                break
    return None


async def dial_back(libp2p_host: Any, ip: str, port: int, peer_id: ID) -> bool:
    """Open a fresh connection to ip:port and complete the security handshake with `peer_id`
    there (the swarm's private-network protector first, when it has one). Never raises."""
    network = libp2p_host.get_network()
    family = "ip6" if ":" in ip else "ip4"
    ma = multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")
    raw = None
    try:
        with trio.fail_after(DIALBACK_DEADLINE):
            transport = network.transport_manager.transport_for_dialing(ma)
            raw = await transport.dial(ma)
            if network.psk is not None:
                import libp2p.network.swarm as swarm_module   # the protector installed at call time
                raw = swarm_module.new_protected_conn(raw, network.psk)
            secured = await network.upgrader.upgrade_security(raw, True, peer_id)
            return bool(secured.get_remote_peer() == peer_id)
    except Exception as exc:  # TooSlowError, refused, handshake failure, wrong peer
        logger.debug("dial-back to %s at %s:%d failed: %r", peer_id, ip, port, exc)
        return False
    finally:
        if raw is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await raw.close()
                except Exception:
                    pass


async def _tcp_reaches(ip: str, port: int) -> bool:
    try:
        with trio.fail_after(DIALBACK_DEADLINE):
            stream = await trio.open_tcp_stream(ip, port)
    except (OSError, trio.TooSlowError):
        return False
    await trio.aclose_forcefully(stream)
    return True


def serve_dialback(host: Any) -> None:
    """Answer dial-back requests on `host` (a `p2p.Host`)."""

    async def handle(peer_id: ID, request: Message) -> Message:
        assert isinstance(request, DialBackRequest)
        endpoint = remote_endpoint(host.libp2p, peer_id)
        if endpoint is None:
            raise RemoteError("bad_request", "dial-back needs a direct connection (this one is relayed)")
        ip, seen_port = endpoint
        found: dict[int, bool] = {}
        lane = [False]

        async def libp2p_port(port: int) -> None:
            found[port] = await dial_back(host.libp2p, ip, port, peer_id)

        async def lane_port(port: int) -> None:
            lane[0] = await _tcp_reaches(ip, port)

        async with trio.open_nursery() as nursery:   # at once: behind a NAT each one times out
            for port in request.ports:
                nursery.start_soon(libp2p_port, port)
            if request.lane_port is not None:
                nursery.start_soon(lane_port, request.lane_port)
        reached = next((port for port in request.ports if found.get(port)), None)
        return DialBackResult(ip, reached, lane[0], seen_port)

    host.set_unary_handler(DIALBACK_PROTOCOL, handle, max_concurrent_per_peer=1, accepts=DialBackRequest)


@dataclass
class Check:
    """What one round of dial-back checks found."""

    status: str
    observed_ip: str | None
    lane_reachable: bool | None
    port_preserving: bool | None = None
    reached_port: int | None = None


def conclude(results: list[DialBackResult | None], local_ports: list[int | None] | None = None) -> Check | None:
    """Fold the answers of one round (None: a checker that did not answer) into a verdict, or
    None when too few answered to say. `local_ports[i]`: our port on the connection checker i
    saw; a NAT that kept it (the checker saw the same port) is port-preserving, which is what a
    hole punch from our listen port relies on."""
    answered = [(r, (local_ports or [None] * len(results))[i]) for i, r in enumerate(results) if r is not None]
    public = [r.observed_ip for r, _ in answered if is_public_ip(r.observed_ip)]
    observed = public[0] if public else (answered[0][0].observed_ip if answered else None)
    lanes = [r.lane_reached for r, _ in answered]
    lane = any(lanes) if lanes else None
    kept = [r.observed_port == port for r, port in answered if r.observed_port is not None and port is not None]
    preserving = all(kept) if kept else None
    reached = [r for r, _ in answered if r.reached_port is not None]
    if reached:
        best = next((r for r in reached if is_public_ip(r.observed_ip)), reached[0])
        return Check(ReachStatus.DIRECT, best.observed_ip, lane, preserving, best.reached_port)
    if len(answered) >= FAILURES_NEEDED or (answered and len(answered) == len(results)):
        return Check(ReachStatus.RELAYED, observed, lane, preserving)
    return None


class Reachability:
    """Our reachability, kept current by asking peers to dial us back (see the module doc)."""

    def __init__(self, host: Any, listen_ports: Callable[[], list[int]], lane_port: Callable[[], int | None],
                 *, recheck_interval: float = RECHECK_INTERVAL) -> None:
        self._host = host
        self._listen_ports = listen_ports
        self._lane_port = lane_port
        self._recheck_interval = recheck_interval
        self.status = ReachStatus.UNKNOWN
        self.observed_ip: str | None = None
        self.lane_reachable: bool | None = None
        self.port_preserving: bool | None = None   # our NAT keeps source ports (None: not known)
        self.reached_port: int | None = None       # the port a checker reached us at (DIRECT)
        self.checks = 0
        self.checked = trio.Event()   # set once a round has concluded (or found nobody to ask)
        self._changed = trio.Event()
        self._wake = trio.Event()

    def _peers(self) -> list[ID]:
        """Connected peers over direct connections, public ones first, shuffled within each."""
        peers = [(p, ip) for p in self._host.connected_peers() if (ip := remote_ip(self._host.libp2p, p))]
        random.shuffle(peers)
        peers.sort(key=lambda pair: not is_public_ip(pair[1]))
        return [p for p, _ in peers]

    def recheck(self) -> None:
        """Ask for a new check soon (an address change, new peers)."""
        self._wake.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def check_once(self) -> Check | None:
        """One round: ask up to `CHECKERS` peers at once; update and return the verdict."""
        ports = self._listen_ports()[:MAX_PORTS]
        peers = self._peers()[:CHECKERS]
        if not ports or not peers:
            return None
        request = DialBackRequest(tuple(ports), self._lane_port())
        results: list[DialBackResult | None] = [None] * len(peers)

        async def ask(i: int, peer: ID) -> None:
            try:
                with trio.fail_after(REQUEST_DEADLINE):
                    reply = await self._host.request(peer, DIALBACK_PROTOCOL, request)
            except (P2PError, trio.TooSlowError) as exc:
                logger.debug("dial-back check by %s failed: %r", peer, exc)
                return
            if isinstance(reply, DialBackResult):
                results[i] = reply

        async with trio.open_nursery() as nursery:
            for i, peer in enumerate(peers):
                nursery.start_soon(ask, i, peer)
        self.checks += 1
        verdict = conclude(results, [local_port(self._host.libp2p, p) for p in peers])
        if verdict is not None:
            self._apply(verdict)
            self.checked.set()
        return verdict

    def _apply(self, verdict: Check) -> None:
        before = (self.status, self.observed_ip, self.lane_reachable, self.port_preserving)
        self.status, self.observed_ip = verdict.status, verdict.observed_ip or self.observed_ip
        if verdict.lane_reachable is not None:
            self.lane_reachable = verdict.lane_reachable
        if verdict.port_preserving is not None:
            self.port_preserving = verdict.port_preserving
        self.reached_port = verdict.reached_port
        if (self.status, self.observed_ip, self.lane_reachable, self.port_preserving) != before:
            logger.info("reachability: %s (seen as %s; lane port %s; NAT %s source ports)", self.status,
                        self.observed_ip, {True: "reachable", False: "unreachable", None: "unknown"}[self.lane_reachable],
                        {True: "keeps", False: "changes", None: "may change"}[self.port_preserving])
            self._changed.set()
            self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check now (if we have peers), then on `recheck()`, new peers when we had none, a new
        observed IP, and every `recheck_interval`."""

        async def on_connected(peer: ID) -> None:
            if self.status == ReachStatus.UNKNOWN or self.checks == 0:
                self.recheck()

        self._host.on_peer_connected(on_connected)
        task_status.started()
        moved = False
        while True:
            observed = self.observed_ip
            verdict = await self.check_once()
            if not moved and verdict is not None and observed is not None and verdict.observed_ip not in (None, observed):
                moved = True
                continue  # our address changed: check again at once against the new one (once)
            moved = False
            delay = self._recheck_interval if verdict is not None else min(self._recheck_interval, 5.0)
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
