"""Route choice: the cheapest chain of servers covering blocks [start, end), a pure function.

The graph's states are (block boundary, last server). Entering server s at boundary p and
leaving it at boundary q costs

    hop latency (the previous server's measured RTT to s, else the client's, else a default;
    measured RTTs travel the connection the hop will use: through a relay when there is no
    direct one, so a relayed hop costs what it measured)
    + (q - p) blocks x s's time per block (1 / inference_rps, else a default)
    + a load penalty growing with s's active sessions

and the chain ends with one more hop back to the client. Servers that are not ONLINE, whose
lease expired, that lack cache room for the session, or that the allow/block lists exclude are
never used. Ties break on peer id, so the same view always gives the same route.

Claims are not trusted blindly (a record is signed by its server, which may lie about itself):

* a server that refused a session with BAD_REQUEST for blocks and a model its record announces
  (`distrust_refusal`) is not routed through by this client for `DISTRUST_TTL`;
* a claimed speed counts for at most `MAX_CLAIMED_ADVANTAGE` times the median claim of the
  usable servers, so one record claiming an absurd rate cannot pull every route through it;
* a speed the client measured (`observe_hop`: per-block time of a hop, from its steps' echoes)
  replaces the claim once it is `LIE_FACTOR` times slower than claimed.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from typing import Iterable

import p2p
from crdt import ServerRecord, ServerState, peer_id_to_str

from ._errors import InvalidSpanError, LaminaError

DEFAULT_HOP_MS = 5.0            # one-way latency assumed when nothing was measured
DEFAULT_BLOCK_MS = 2.0          # per-block step time assumed when a server announced no rate
LOAD_PENALTY_MS = 1.0           # added per active session already on the server, per block
MAX_BLOCK_MS = 60_000.0
DISTRUST_TTL = 600.0            # seconds a server that refused what it announced is not used
MAX_CLAIMED_ADVANTAGE = 20.0    # a claim counts for at most this many times the median claim
LIE_FACTOR = 4.0                # measured this many times slower than claimed: the measure counts
MEASURE_WEIGHT = 0.5            # weight of a new measurement in the running per-block time
MEASURE_TTL_MS = 600_000        # a measurement older than this no longer counts (servers change)


class NoRouteError(LaminaError):
    """No chain of usable servers covers the blocks."""


@dataclass(frozen=True)
class Hop:
    peer_id: str       # base58 peer id
    start: int
    end: int
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteOptions:
    allowed_peers: frozenset[str] | None = None    # only these (None: any)
    blocked_peers: frozenset[str] = frozenset()
    # the client's measured RTTs to servers (a relayed server's include the relay's detour),
    # filled by the client's sessions as they go (`Chain`), and when each was measured
    client_rtts_ms: dict[str, float] = field(default_factory=dict)
    client_rtts_at: dict[str, float] = field(default_factory=dict)
    # servers caught announcing what they refuse (`distrust_refusal`), shared by the client's
    # sessions; and each server's measured per-block step time (`observe_hop`)
    distrusted: p2p.ExpiringSet = field(default_factory=lambda: p2p.ExpiringSet(DISTRUST_TTL))
    measured_block_ms: dict[str, tuple[float, int]] = field(default_factory=dict)  # (ms, when: wall ms)
    # servers a spot check caught returning wrong outputs (`pipeline._spotcheck`): peer id ->
    # what was found; never routed through again by this client
    faulty: dict[str, str] = field(default_factory=dict)

    def distrust_refusal(self, peer_id: str, error: BaseException) -> bool:
        """Note that `peer_id` refused to open a session the router chose from its record;
        returns whether it is now distrusted. BUSY and DRAINING are honest, passing states
        (the node said so; the session routes around it once); BAD_REQUEST means the node does
        not serve the blocks or the model its signed record announces (or refuses sessions of
        this length: not routable for this client either)."""
        if isinstance(error, p2p.RemoteError) and error.code == p2p.ErrorCode.BAD_REQUEST:
            self.distrusted.add(peer_id)
            return True
        return False

    def observe_hop(self, peer_id: str, blocks: int, elapsed_ms: float, now_ms: int) -> None:
        """A one-token decode step through `blocks` of `peer_id`'s blocks took `elapsed_ms`
        (from the previous hop's echo to this hop's, or from the send for the first hop), seen
        at wall time `now_ms`, less the client's measured round trip to it. A running average; older than `MEASURE_TTL_MS`, it is forgotten."""
        if blocks <= 0 or not 0.0 <= elapsed_ms < MAX_BLOCK_MS * blocks:
            return
        # the network's share: at most the client's round trip to the peer (a later hop's
        # share is one hop between nodes; taking off more only makes the measure lenient)
        sample = max(0.0, elapsed_ms - self.client_rtts_ms.get(peer_id, 0.0)) / blocks
        old = self.measured_block_ms.get(peer_id)
        if old is not None and now_ms - old[1] < MEASURE_TTL_MS:
            sample = old[0] + MEASURE_WEIGHT * (sample - old[0])
        self.measured_block_ms[peer_id] = (sample, now_ms)


def usable(record: ServerRecord, now_ms: int, needed_tokens: int, opts: RouteOptions,
           excluded: Iterable[str] = ()) -> bool:
    pid = peer_id_to_str(record.peer_id)
    if record.state is not ServerState.ONLINE or record.expires_ms <= now_ms:
        return False
    if pid in opts.blocked_peers or pid in excluded or pid in opts.distrusted or pid in opts.faulty:
        return False
    if opts.allowed_peers is not None and pid not in opts.allowed_peers:
        return False
    return record.load.free_cache_tokens >= needed_tokens


def _claimed_ms(r: ServerRecord) -> float:
    return 1000.0 / r.inference_rps if r.inference_rps > 0 else DEFAULT_BLOCK_MS


def block_costs(servers: list[ServerRecord], opts: RouteOptions, now_ms: int) -> list[float]:
    """Each server's cost per block (ms): its claim, bounded below by the median claim over
    `MAX_CLAIMED_ADVANTAGE`, replaced by what the client measured (within `MEASURE_TTL_MS`)
    when that is `LIE_FACTOR` times slower; plus the load penalty."""
    claims = [_claimed_ms(r) for r in servers]
    floor = statistics.median(claims) / MAX_CLAIMED_ADVANTAGE if claims else 0.0
    costs = []
    for r, claim in zip(servers, claims):
        base = max(claim, floor)
        measured = opts.measured_block_ms.get(peer_id_to_str(r.peer_id))
        if measured is not None and now_ms - measured[1] < MEASURE_TTL_MS and measured[0] > LIE_FACTOR * base:
            base = measured[0]
        costs.append(min(base + LOAD_PENALTY_MS * r.load.active_sessions, MAX_BLOCK_MS))
    return costs


def choose_route(records: Iterable[ServerRecord], start: int, end: int, *, now_ms: int,
                 needed_tokens: int = 0, options: RouteOptions = RouteOptions(),
                 excluded: Iterable[str] = ()) -> list[Hop]:
    """The cheapest chain covering [start, end), or NoRouteError naming the first gap."""
    if not 0 <= start < end:
        raise InvalidSpanError(f"cannot route the empty block range [{start}, {end})")
    excluded = set(excluded)
    servers = sorted((r for r in records if usable(r, now_ms, needed_tokens, options, excluded)),
                     key=lambda r: r.peer_id)
    if not servers:
        raise NoRouteError(f"no usable server for blocks [{start}, {end})")
    boundaries = sorted({start, end} | {b for r in servers for b in (r.start, r.end) if start < b < end})
    ids = [peer_id_to_str(r.peer_id) for r in servers]
    block_ms = block_costs(servers, options, now_ms)

    def hop_ms(prev: int | None, nxt: int) -> float:
        if prev is None:
            return options.client_rtts_ms.get(ids[nxt], 2 * DEFAULT_HOP_MS) / 2
        rtt = servers[prev].rtt_to(servers[nxt].peer_id)
        return rtt / 2 if rtt is not None else DEFAULT_HOP_MS

    # Dijkstra over (boundary, last server index or -1 for the client)
    best: dict[tuple[int, int], float] = {(start, -1): 0.0}
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    heap: list[tuple[float, int, int]] = [(0.0, start, -1)]
    done: tuple[int, int] | None = None
    while heap:
        cost, pos, last = heapq.heappop(heap)
        if cost > best.get((pos, last), float("inf")):
            continue
        if pos == end:
            done = (pos, last)
            break
        for i, r in enumerate(servers):
            if not (r.start <= pos < r.end) or i == last:
                continue
            enter = cost + hop_ms(None if last < 0 else last, i)
            for q in boundaries:
                if q <= pos or q > r.end:
                    continue
                total = enter + (q - pos) * block_ms[i]
                if q == end:
                    total += options.client_rtts_ms.get(ids[i], 2 * DEFAULT_HOP_MS) / 2
                if total < best.get((q, i), float("inf")):
                    best[(q, i)] = total
                    parent[(q, i)] = (pos, last)
                    heapq.heappush(heap, (total, q, i))
    if done is None:
        covered = {b for r in servers for b in range(max(r.start, start), min(r.end, end))}
        gap = next(b for b in range(start, end) if b not in covered) if len(covered) < end - start \
            else start
        raise NoRouteError(f"no chain of usable servers covers blocks [{start}, {end}); "
                           f"block {gap} has no server")
    hops: list[Hop] = []
    state = done
    while state[1] >= 0:
        prev = parent[state]
        r = servers[state[1]]
        hops.append(Hop(ids[state[1]], prev[0], state[0], r.addrs))
        state = prev
    hops.reverse()
    return _merge_adjacent(hops)


def _merge_adjacent(hops: list[Hop]) -> list[Hop]:
    """Consecutive hops on the same server become one (a server never pushes to itself)."""
    out: list[Hop] = []
    for h in hops:
        if out and out[-1].peer_id == h.peer_id and out[-1].end == h.start:
            out[-1] = Hop(h.peer_id, out[-1].start, h.end, h.addrs)
        else:
            out.append(h)
    return out


def describe_route(hops: list[Hop]) -> str:
    return " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end})" for h in hops)
