"""Per-peer limits of a node (issue 21): what one peer may hold here, and how big its frames may be.

The node's `CacheBudget` says what the node can hold in all (session slots, KV tokens); these say
how much of it one peer may take, so that no peer can hold every slot or all the KV memory:

=====================  ===========================================  ==============================
limit                  default                                      run-node flag
=====================  ===========================================  ==============================
sessions per peer      half of --max-sessions (at least 1)          --max-sessions-per-peer
KV tokens per peer     half of the KV budget, and at least one      --max-cache-tokens-per-peer
                       session of the longest length taken
new sessions a second  20 per peer, bursts of its session limit     --session-open-rate
                       (or of 2 s at that rate, if more)
=====================  ===========================================  ==============================

A gateway that multiplexes many users over one peer stays far below these with the defaults (64
sessions at once on a default node). The checks run on OpenSession after the global budget's
(whose refusal says the node is full): their refusals are BUSY error frames naming the limit and
its flag, which clients route around. The open rate is checked by the host before a session
even starts (`p2p.Host.set_session_handler(open_rate=...)`).

Frames: a stream's first messages are small (`OPEN_FRAME_LIMIT`); once a session is open, the
largest frame the peer may send it is what the session can hold (`session_frame_limit`: a Replay
of every position), refused at its length prefix, before any of its bytes are buffered. A push
stream, whose steps follow its PushOpen at once, starts at the largest session any peer may
open here (`largest_frame_limit`).
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass

import p2p
from pipeline.protocol import BUSY

from ._config import DEFAULT_SESSION_OPEN_RATE, PEER_SHARE
from ._sessions import CacheBudget

logger = logging.getLogger("lamina.node")

# room in a frame beyond its tensor: the msgpack header (a Replay's step ids and chunks: ~60 KiB
# at most), padding
FRAME_SLACK = 256 * 1024
OPEN_FRAME_LIMIT = 64 * 1024  # OpenSession, PushOpen, LaneHello, InfoRequest: a few hundred bytes
WIDEST_DTYPE = 4  # float32: the widest hidden-state dtype on the wire


@dataclass(frozen=True)
class PeerLimits:
    """run-node's per-peer flags; None: the default (see the module docstring)."""

    sessions: int | None = None
    cache_tokens: int | None = None
    open_rate: float = DEFAULT_SESSION_OPEN_RATE


class PeerShares:
    """The sessions and KV tokens each peer holds on this node, checked against `PeerLimits`.
    The limits that follow the budget are computed from the budget of the moment (a node that
    moves to other blocks gets a new one)."""

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self._held: dict[object, tuple[int, int]] = {}  # peer -> (sessions, KV tokens)
        self.refused = 0

    def max_sessions(self, budget: CacheBudget) -> int:
        return self.limits.sessions or max(1, int(budget.max_sessions * PEER_SHARE))

    def max_tokens(self, budget: CacheBudget, longest: int) -> int:
        """A peer's KV share: the flag's, else half the budget but at least one session of the
        longest length taken (`longest` tokens) -- so a node with a small budget still serves
        one client's longest session."""
        return self.limits.cache_tokens or max(int(budget.total_tokens * PEER_SHARE), longest)

    def open_burst(self, budget: CacheBudget) -> int:
        """How many sessions a peer may open at once before the open rate applies: its session
        limit, or two seconds' worth at the open rate if that is more."""
        return max(self.max_sessions(budget), math.ceil(2 * self.limits.open_rate))

    def held(self, peer: object) -> tuple[int, int]:
        return self._held.get(peer, (0, 0))

    def check(self, peer: object, tokens: int, budget: CacheBudget, longest: int) -> None:
        """Raise BUSY when a new session of `tokens` KV tokens would take `peer` over a limit."""
        sessions, held = self.held(peer)
        limit = self.max_sessions(budget)
        if sessions >= limit:
            self.refused += 1
            raise p2p.RemoteError(BUSY, f"this peer already holds {sessions} sessions on this node, the most one "
                                        f"peer may (the per-peer session limit, --max-sessions-per-peer {limit})")
        share = self.max_tokens(budget, longest)
        if held + tokens > share:
            self.refused += 1
            raise p2p.RemoteError(BUSY, f"this peer's sessions would hold {held + tokens} KV cache tokens on this "
                                        f"node ({held} now + {tokens} asked), more than one peer may (the per-peer "
                                        f"KV share, --max-cache-tokens-per-peer {share})")

    def add(self, peer: object, tokens: int) -> None:
        sessions, held = self.held(peer)
        self._held[peer] = (sessions + 1, held + tokens)

    def remove(self, peer: object, tokens: int) -> None:
        sessions, held = self.held(peer)
        if sessions <= 1:
            self._held.pop(peer, None)
        else:
            self._held[peer] = (sessions - 1, held - tokens)


def session_frame_limit(batch: int, max_length: int, hidden_size: int, dtype: str) -> int:
    """The largest frame a session's client (or upstream node) may send it: a Replay of every
    position it holds, in its wire dtype."""
    return batch * max_length * hidden_size * p2p.DTYPE_SIZES[dtype] + FRAME_SLACK


def session_frame_reason(batch: int, max_length: int, hidden_size: int, dtype: str) -> str:
    return (f"the largest frame this session can use: batch {batch} x max_length {max_length} x hidden size "
            f"{hidden_size} x {p2p.DTYPE_SIZES[dtype]} bytes, plus {FRAME_SLACK} for the header")


def largest_frame_limit(tokens: int, hidden_size: int) -> int:
    """The largest frame of the largest session a peer may open (`tokens` KV tokens)."""
    return tokens * hidden_size * WIDEST_DTYPE + FRAME_SLACK


def descriptors_needed(max_connections: int, max_sessions: int) -> int:
    """File descriptors a node holds at its limits: libp2p connections and those handshaking,
    the lanes coming in (a session's from its client, a push from upstream: two a session, at
    most `LANE_MAX_OPEN`) and those presenting their tickets, a push lane out per session, with
    room for listeners, model files, the HTTP server and the rest."""
    c = p2p.constants
    lanes_in = min(2 * max_sessions, c.LANE_MAX_OPEN) + c.LANE_MAX_HANDSHAKES
    return max_connections + c.MAX_HANDSHAKES + lanes_in + max_sessions + 256


def raise_descriptor_limit(max_connections: int, max_sessions: int) -> int:
    """Raise the soft open-files limit (``ulimit -n``) to what the node's limits need, within
    the hard limit; warn when even that is short (accepting then fails with EMFILE, which the
    listeners survive by pausing 0.1 s, but new connections and lanes wait). Returns the limit."""
    need = descriptors_needed(max_connections, max_sessions)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("cannot raise the open-files limit: %r", exc)
    if soft != resource.RLIM_INFINITY and soft < need:
        logger.warning("the open-files limit (ulimit -n) is %d, below the %d that --max-connections %d and "
                       "--max-sessions %d may need: raise it, or lower those", soft, need, max_connections,
                       max_sessions)
    return soft
