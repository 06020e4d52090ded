"""Reachability by dial-back (`p2p._reach`), real hosts on loopback; behind a real NAT in
tests/test_nat.py."""

from __future__ import annotations

import socket

import trio

import p2p
from p2p._reach import (DIALBACK_PROTOCOL, DialBackRequest, DialBackResult, Reachability, ReachStatus, conclude,
                        local_port, serve_dialback)


def _port(host: p2p.Host) -> int:
    return int(host.addrs()[0].split("/tcp/")[1].split("/")[0])


def _dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_checker_dials_back_on_a_fresh_connection(make_host) -> None:
    prober, checker = await make_host(), await make_host()
    serve_dialback(checker)
    await prober.connect(checker.addrs()[0])
    listening = await prober.request(checker.peer_id, DIALBACK_PROTOCOL, DialBackRequest((_port(prober),), _port(prober)))
    ours = local_port(prober.libp2p, checker.peer_id)
    assert ours is not None and listening == DialBackResult("127.0.0.1", _port(prober), True, ours)
    # a port where nothing listens: the existing connection does not count (AutoNAT's bug)
    dead = _dead_port()
    nothing = await prober.request(checker.peer_id, DIALBACK_PROTOCOL, DialBackRequest((dead,), dead))
    assert nothing == DialBackResult("127.0.0.1", None, False, ours)


async def test_another_peer_at_the_port_is_not_us(make_host) -> None:
    """The checker completes the handshake: a listener of another peer at our port fails it."""
    prober, checker, other = await make_host(), await make_host(), await make_host()
    serve_dialback(checker)
    await prober.connect(checker.addrs()[0])
    reply = await prober.request(checker.peer_id, DIALBACK_PROTOCOL, DialBackRequest((_port(other),)))
    assert reply.reached_port is None


async def test_the_prober_concludes_direct_or_relayed(make_host) -> None:
    prober = await make_host()
    checkers = [await make_host() for _ in range(2)]
    for c in checkers:
        serve_dialback(c)
        await prober.connect(c.addrs()[0])
    reach = Reachability(prober, lambda: [_port(prober)], lambda: None)
    verdict = await reach.check_once()
    assert verdict is not None and reach.status == ReachStatus.DIRECT and reach.observed_ip == "127.0.0.1"
    assert reach.port_preserving is True                   # no NAT: every port is our own
    dead = _dead_port()
    unreachable = Reachability(prober, lambda: [dead], lambda: None)
    await unreachable.check_once()
    assert unreachable.status == ReachStatus.RELAYED


async def test_the_service_checks_when_it_gets_peers(make_host, nursery) -> None:
    prober, checker = await make_host(), await make_host()
    serve_dialback(checker)
    reach = Reachability(prober, lambda: [_port(prober)], lambda: None)
    await nursery.start(reach.serve)
    assert reach.status == ReachStatus.UNKNOWN          # no peer to ask yet
    await prober.connect(checker.addrs()[0])
    with trio.fail_after(20):
        while reach.status != ReachStatus.DIRECT:
            await reach.wait_changed()


def test_conclude() -> None:
    ok = DialBackResult("45.1.2.3", 4001, False)
    no = DialBackResult("45.1.2.3", None, False)
    lan = DialBackResult("192.168.1.2", None, True)
    assert conclude([ok, None, None]).status == ReachStatus.DIRECT          # one success is proof
    assert conclude([no, None, None]) is None                               # one failure is not
    assert conclude([no, no, None]).status == ReachStatus.RELAYED
    assert conclude([no]).status == ReachStatus.RELAYED                     # all we could ask
    assert conclude([None, None]) is None
    assert conclude([lan, no]).observed_ip == "45.1.2.3"                    # public observations win
    assert conclude([lan, no]).lane_reachable is True
    seen = DialBackResult("45.1.2.3", None, False, 5000)
    assert conclude([seen, seen], [5000, 5000]).port_preserving is True
    assert conclude([seen, seen], [5000, 6000]).port_preserving is False      # a port changed
    assert conclude([seen, seen]).port_preserving is None                     # nothing to compare


def test_a_forwarded_port_is_announced_at_the_address_that_reached_it() -> None:
    """Behind a NAT with the port forwarded and no --announce-addr, the listen addresses are
    private; the dial-back's observed IP and the port it reached are what others can dial."""
    from types import SimpleNamespace

    from p2p._nat import NatConfig, NatTraversal

    host = SimpleNamespace(config=SimpleNamespace(announce_addrs=[]), peer_id_str="12D3KooWme")
    nat = NatTraversal(host, NatConfig(enabled=True))
    private = ["/ip4/192.168.1.2/tcp/4001/p2p/12D3KooWme"]
    assert nat.advertised(private) == private                       # nothing checked yet
    nat.reach = SimpleNamespace(status=ReachStatus.DIRECT, observed_ip="45.1.2.3", reached_port=4001)
    assert nat.advertised(private) == ["/ip4/45.1.2.3/tcp/4001/p2p/12D3KooWme", *private]
    nat.reach.status = ReachStatus.RELAYED
    assert nat.advertised(private) == private
