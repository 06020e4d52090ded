"""Route choice is a pure function of the swarm view: coverage, costs, exclusions, errors."""

from __future__ import annotations

import pytest

from crdt import Hlc, Load, ModelId, ServerRecord, ServerState, Signer, peer_id_to_str
from pipeline._routing import NoRouteError, RouteOptions, choose_route

MODEL = ModelId("m", b"\x01" * 32)
NOW = 1_000_000
SIGNERS = [Signer(bytes([i + 1]) * 32) for i in range(8)]


def rec(i, start, end, *, state=ServerState.ONLINE, rps=100.0, sessions=0, free=10_000,
        expires=NOW + 10_000, rtts=None):
    return ServerRecord(peer_id=SIGNERS[i].peer_id, model=MODEL, start=start, end=end, state=state,
                        hlc=Hlc(NOW - 100, 0), expires_ms=expires, inference_rps=rps,
                        load=Load(sessions, free), next_rtts=rtts or {})


def pid(i):
    return peer_id_to_str(SIGNERS[i].peer_id)


def spans(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_covers_all_blocks_with_the_fewest_hops_when_costs_are_equal():
    route = choose_route([rec(0, 0, 4), rec(1, 4, 8), rec(2, 0, 8)], 0, 8, now_ms=NOW)
    assert spans(route) == [(pid(2), 0, 8)]


def test_prefers_faster_servers_and_avoids_loaded_ones():
    slow, fast = rec(0, 0, 8, rps=10.0), rec(1, 0, 8, rps=1000.0)
    assert spans(choose_route([slow, fast], 0, 8, now_ms=NOW)) == [(pid(1), 0, 8)]
    busy = rec(1, 0, 8, rps=1000.0, sessions=500)
    assert spans(choose_route([rec(0, 0, 8, rps=200.0), busy], 0, 8, now_ms=NOW)) == [(pid(0), 0, 8)]


def test_uses_measured_rtts_between_servers():
    a = rec(0, 0, 4, rtts={SIGNERS[2].peer_id: 1.0, SIGNERS[1].peer_id: 80.0})
    route = choose_route([a, rec(1, 4, 8), rec(2, 4, 8)], 0, 8, now_ms=NOW)
    assert spans(route) == [(pid(0), 0, 4), (pid(2), 4, 8)]


def test_uses_the_clients_measured_rtts():
    """A server the client reaches through a relay measured slower: the direct one wins, and
    without measurements the tie breaks on peer id as before."""
    servers = [rec(0, 0, 8), rec(1, 0, 8)]
    (tie,) = spans(choose_route(servers, 0, 8, now_ms=NOW))
    other = pid(1) if tie[0] == pid(0) else pid(0)
    measured = RouteOptions(client_rtts_ms={tie[0]: 90.0, other: 3.0})   # the tie's winner is relayed
    assert spans(choose_route(servers, 0, 8, now_ms=NOW, options=measured)) == [(other, 0, 8)]


def test_skips_draining_expired_full_and_blocked_servers():
    records = [rec(0, 0, 8, state=ServerState.DRAINING), rec(1, 0, 8, expires=NOW - 1),
               rec(2, 0, 8, free=10), rec(3, 0, 8), rec(4, 0, 8, rps=1.0)]
    opts = RouteOptions(blocked_peers=frozenset({pid(3)}))
    route = choose_route(records, 0, 8, now_ms=NOW, needed_tokens=100, options=opts)
    assert spans(route) == [(pid(4), 0, 8)]
    only = RouteOptions(allowed_peers=frozenset({pid(3)}))
    assert spans(choose_route(records, 0, 8, now_ms=NOW, options=only)) == [(pid(3), 0, 8)]


def test_replacement_for_a_lost_span_may_split_differently():
    records = [rec(0, 0, 3), rec(1, 3, 6), rec(2, 6, 8), rec(3, 2, 5), rec(4, 5, 7)]
    route = choose_route(records, 3, 6, now_ms=NOW, excluded={pid(1)})
    assert spans(route) == [(pid(3), 3, 5), (pid(4), 5, 6)]


def test_a_gap_is_a_clear_error():
    with pytest.raises(NoRouteError, match="block 4 has no server"):
        choose_route([rec(0, 0, 4), rec(1, 5, 8)], 0, 8, now_ms=NOW)
    with pytest.raises(NoRouteError, match="no usable server"):
        choose_route([rec(0, 0, 8, state=ServerState.OFFLINE)], 0, 8, now_ms=NOW)


def test_deterministic_whatever_the_input_order():
    records = [rec(i, s, e) for i, (s, e) in enumerate([(0, 4), (0, 4), (4, 8), (4, 8), (2, 6)])]
    first = spans(choose_route(records, 0, 8, now_ms=NOW))
    assert all(spans(choose_route(list(reversed(records)), 0, 8, now_ms=NOW)) == first for _ in range(3))
