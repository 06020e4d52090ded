"""Circuit relay v2 (`p2p._relay`, `p2p._relay_client`) with real hosts on loopback.

A "target" here announces a dead port (nothing dials it directly): its dialers know only its
circuit addresses, and reach it through a relay on which it holds a reservation. Timings printed
(run with -s) are what the report quotes. A relay that must freeze (SIGSTOP) is this file run as
a script (``python tests/test_p2p_relay.py relay``), which prints its address and peer id.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import libp2p.network.swarm as swarm_module
import pytest
import trio
from libp2p.host.ping import ID as PING_ID
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.utils.varint import encode_varint_prefixed

import p2p
from _wait import eventually
from p2p._relay import (
    HOP_PROTOCOL_ID,
    STOP_PROTOCOL_ID,
    RelayLimits,
    circuit_addr,
    is_relayed,
    parse_circuit_addr,
    serve_relay,
    serve_stop,
)
from p2p._relay_client import (
    PING_GRACE,
    RELAY_PING_DEADLINE,
    RELAY_PING_INTERVAL,
    RELAY_PING_MISSES,
    RelayRefusedError,
    Reservations,
    dial_circuit,
    reserve,
)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
DEAD = ["/ip4/127.0.0.1/tcp/1"]  # a target's announced address: nothing listens there
ECHO = "/test/relay/echo/1"


@p2p.message("test.relay.blob")
@dataclass(frozen=True)
class Blob(p2p.Message):
    text: str
    data: bytes = b""


async def echo(peer: object, request: p2p.Message) -> p2p.Message:
    return request


async def echo_session(peer: object, session: p2p.Session) -> None:
    async for msg in session:
        await session.send(msg)


def _config(**kwargs) -> p2p.HostConfig:  # type: ignore[no-untyped-def]
    kwargs.setdefault("listen_addrs", LOOPBACK)
    return p2p.HostConfig(identity=p2p.Identity.generate(), enable_dht=False, enable_gossip=False, **kwargs)


def _tcp(host: p2p.Host) -> str:
    return host.addrs()[0]


async def _relay(make_host, nursery, limits: RelayLimits | None = None):  # type: ignore[no-untyped-def]
    host = await make_host()
    return host, await nursery.start(serve_relay, host.libp2p, limits)


async def _peer(make_host, nursery, **kwargs) -> p2p.Host:  # type: ignore[no-untyped-def]
    """A host that serves the stop side (accepts relayed connections) and the echo protocols."""
    host = await make_host(**kwargs)
    await nursery.start(serve_stop, host.libp2p)
    host.set_unary_handler(ECHO, echo)
    host.set_session_handler(ECHO + "/session", echo_session)
    return host


async def _target(make_host, nursery) -> p2p.Host:  # type: ignore[no-untyped-def]
    return await _peer(make_host, nursery, announce_addrs=DEAD)


@asynccontextmanager
async def _own_relay(limits: RelayLimits | None = None):  # type: ignore[no-untyped-def]
    """A relay host that the test can stop (leaving the block closes it)."""
    async with p2p.open_host(_config()) as host, trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, host.libp2p, limits)
        yield host, relay
        nursery.cancel_scope.cancel()


async def _held(reservations: Reservations, want: set) -> None:  # type: ignore[type-arg]
    """Wait (on the change event) until `reservations` holds exactly the relays `want`."""
    with trio.fail_after(30):
        while set(reservations.relays()) != want:
            await reservations.wait_changed()


async def _request(client: p2p.Host, target: p2p.Host, text: str = "hi", data: bytes = b"") -> None:
    reply = await client.request(target.peer_id, ECHO, Blob(text, data))
    assert reply == Blob(text, data)


def _relayed_only(client: p2p.Host, target: p2p.Host) -> bool:
    conns = client.libp2p.get_network().connections.get(target.peer_id) or []
    return bool(conns) and all(is_relayed(c) for c in conns)


# --- addresses ---------------------------------------------------------------------------------
def test_circuit_addresses_parse_and_build() -> None:
    relay, target = p2p.Identity.generate().peer_id, p2p.Identity.generate().peer_id
    text = circuit_addr("/ip4/1.2.3.4/tcp/4001", relay, target)
    assert text == f"/ip4/1.2.3.4/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}"
    assert circuit_addr(f"/ip4/1.2.3.4/tcp/4001/p2p/{relay}", relay, target) == text
    addr, relay_id, target_id = parse_circuit_addr(text)
    assert (str(addr), relay_id, target_id) == ("/ip4/1.2.3.4/tcp/4001", relay, target)
    for bad in ["/ip4/1.2.3.4/tcp/4001", f"/ip4/1.2.3.4/tcp/4001/p2p/{relay}",
                f"/p2p/{relay}/p2p-circuit/p2p/{target}", f"/ip4/1.2.3.4/tcp/4001/p2p-circuit/p2p/{target}",
                f"/ip4/1.2.3.4/tcp/4001/p2p/{relay}/p2p-circuit", f"/ip4/1.2.3.4/tcp/1/p2p/{relay}/p2p-circuit/p2p/x",
                f"/ip4/1.2.3.4/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{relay}"]:
        with pytest.raises(ValueError):
            parse_circuit_addr(bad)
    with pytest.raises(ValueError):
        RelayLimits(max_reservations=0)


# --- reservations and dialling -------------------------------------------------------------------
async def test_reserve_on_two_relays_then_request_and_session_through_a_circuit(make_host, nursery) -> None:
    (r1, _), (r2, relay2) = await _relay(make_host, nursery), await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    reservations = Reservations(target.libp2p, lambda: [(r1.peer_id, [_tcp(r1)]), (r2.peer_id, [_tcp(r2)])])
    started = trio.current_time()
    await nursery.start(reservations.serve)
    await _held(reservations, {r1.peer_id, r2.peer_id})
    print(f"\n2 reservations in {1000 * (trio.current_time() - started):.0f} ms")
    want = {circuit_addr(_tcp(r), r.peer_id, target.peer_id) for r in (r1, r2)}
    assert set(reservations.circuit_addrs()) == want

    addr = circuit_addr(_tcp(r2), r2.peer_id, target.peer_id)
    started = trio.current_time()
    await dial_circuit(client.libp2p, addr)
    print(f"circuit dial in {1000 * (trio.current_time() - started):.0f} ms")
    assert _relayed_only(client, target)  # the client never had a direct connection
    assert relay2.circuits() == [(client.peer_id, target.peer_id)]
    started = trio.current_time()
    await _request(client, target, "through the relay", bytes(range(256)) * 1024)
    print(f"first request (256 KiB each way) in {1000 * (trio.current_time() - started):.0f} ms")
    async with client.open_session(target.peer_id, ECHO + "/session") as session:
        for i in range(20):
            await session.send(Blob(str(i)))
            assert (await session.receive()).text == str(i)
    # and the other way, over the same relayed connection
    await _request(target, client, "back")
    assert _relayed_only(target, client)


async def test_dial_needs_a_reservation_and_never_makes_one(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    addr = circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id)
    with pytest.raises(RelayRefusedError) as refused:
        await dial_circuit(client.libp2p, addr)
    assert refused.value.status == StatusCode.NO_RESERVATION
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])
    await dial_circuit(client.libp2p, addr)
    await _request(client, target)
    assert relay.reservations() == [target.peer_id]  # the dialer took no slot
    not_a_relay = await make_host()
    with pytest.raises(RelayRefusedError) as refused:
        await reserve(target.libp2p, not_a_relay.peer_id, [_tcp(not_a_relay)])
    assert refused.value.status is None


async def test_closing_one_circuit_leaves_the_others_to_the_same_target(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery)
    target = await _target(make_host, nursery)
    one, two = await _peer(make_host, nursery), await _peer(make_host, nursery)
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])
    addr = circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id)
    for client in (one, two):
        await dial_circuit(client.libp2p, addr)
        await _request(client, target)
    assert len(relay.circuits()) == 2
    for conn in list(one.libp2p.get_network().connections.get(target.peer_id) or []):
        await conn.close()
    await eventually(lambda: relay.circuits() == [(two.peer_id, target.peer_id)])
    for i in range(5):  # py-libp2p's relay closed the other circuit too (keyed by target)
        await _request(two, target, f"still here {i}", b"x" * 100_000)
    assert _relayed_only(two, target) and not one.is_connected(target.peer_id)
    await dial_circuit(one.libp2p, addr)  # a dead circuit left the swarm: dialling again works
    await _request(one, target)


async def test_a_lost_relay_is_replaced_within_seconds(make_host, nursery) -> None:
    (r2, _), (r3, _) = await _relay(make_host, nursery), await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    async with _own_relay() as (r1, _):
        candidates = [(h.peer_id, [_tcp(h)]) for h in (r1, r2, r3)]
        reservations = Reservations(target.libp2p, lambda: candidates)
        await nursery.start(reservations.serve)
        await _held(reservations, {r1.peer_id, r2.peer_id})  # the first two, in order of preference
        gone = circuit_addr(_tcp(r1), r1.peer_id, target.peer_id)
        assert gone in reservations.circuit_addrs()
        stopped = trio.current_time()
    await _held(reservations, {r2.peer_id, r3.peer_id})
    took = trio.current_time() - stopped
    print(f"\nfailover to a new relay in {1000 * took:.0f} ms after the relay closed")
    assert took < 3.0  # event-driven: nothing waits for a poll interval
    addrs = reservations.circuit_addrs()
    assert gone not in addrs and circuit_addr(_tcp(r3), r3.peer_id, target.peer_id) in addrs
    await dial_circuit(client.libp2p, circuit_addr(_tcp(r3), r3.peer_id, target.peer_id))
    await _request(client, target)


# --- relays that die silently (no FIN, no RST): found by pinging them ------------------------------
@asynccontextmanager
async def _relay_process() -> AsyncIterator[tuple[trio.Process, ID, str]]:
    """A relay in a child process (this file run as a script): (process, peer id, address)."""
    process = await trio.lowlevel.open_process([sys.executable, __file__, "relay"], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "the relay process exited"
                line += chunk
        addr, peer = line.decode().split()
        yield process, ID.from_base58(peer), addr
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            await process.wait()


async def _serve_relay_process() -> None:
    async with p2p.open_host(_config()) as host, trio.open_nursery() as nursery:
        await nursery.start(serve_relay, host.libp2p)
        print(_tcp(host), host.peer_id, flush=True)
        await trio.sleep_forever()


@pytest.mark.slow  # starts a relay process
async def test_a_frozen_relay_is_replaced_in_about_10s(make_host, nursery) -> None:
    (r2, _), (r3, _) = await _relay(make_host, nursery), await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    async with _relay_process() as (process, r1, r1_addr):
        candidates = [(r1, [r1_addr]), (r2.peer_id, [_tcp(r2)]), (r3.peer_id, [_tcp(r3)])]
        reservations = Reservations(target.libp2p, lambda: candidates)  # the default ping timing
        await nursery.start(reservations.serve)
        await _held(reservations, {r1, r2.peer_id})
        kept = reservations._held[r2.peer_id]
        frozen = circuit_addr(r1_addr, r1, target.peer_id)
        assert frozen in reservations.circuit_addrs()
        os.kill(process.pid, signal.SIGSTOP)  # its connections stay open: the kernel still ACKs
        stopped = trio.current_time()
        await _held(reservations, {r2.peer_id})
        dropped = trio.current_time() - stopped
        await _held(reservations, {r2.peer_id, r3.peer_id})
        replaced = trio.current_time() - stopped
        print(f"\nfrozen relay dropped after {dropped:.2f} s, replaced after {replaced:.2f} s")
        worst = RELAY_PING_INTERVAL + RELAY_PING_MISSES * RELAY_PING_DEADLINE + PING_GRACE  # 10.25 s
        assert RELAY_PING_MISSES * RELAY_PING_DEADLINE <= dropped and replaced < worst + 2.0
        assert frozen not in reservations.circuit_addrs()
        assert r1 in reservations.backing_off()
        await eventually(lambda: not target.is_connected(r1), timeout=5)  # our connection closed
        print(f"connection to the frozen relay closed after {trio.current_time() - stopped:.2f} s")
        assert reservations._held[r2.peer_id] is kept  # the live relay was never let go
        await dial_circuit(client.libp2p, circuit_addr(_tcp(r3), r3.peer_id, target.peer_id))
        await _request(client, target)


def _ping_handler(delay: float | None, served: list[int]):  # type: ignore[no-untyped-def]
    """A ping handler that answers each ping `delay` s late, or never (None)."""

    async def handle(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                payload = await read_exactly(stream, 32)
                served.append(1)
                if delay is None:
                    await trio.sleep_forever()
                await trio.sleep(delay)
                await stream.write(payload)
        except Exception:
            await stream.reset()

    return handle


async def test_a_relay_that_stops_answering_pings_is_replaced(make_host, nursery) -> None:
    (r1, _), (r2, _), (r3, _) = [await _relay(make_host, nursery) for _ in range(3)]
    target = await _target(make_host, nursery)
    candidates = [(h.peer_id, [_tcp(h)]) for h in (r1, r2, r3)]
    reservations = Reservations(target.libp2p, lambda: candidates, ping_interval=0.2, ping_deadline=0.3)
    await nursery.start(reservations.serve)
    await _held(reservations, {r1.peer_id, r2.peer_id})
    served: list[int] = []
    r1.libp2p.set_stream_handler(PING_ID, _ping_handler(None, served))  # the connection stays up
    stopped = trio.current_time()
    await _held(reservations, {r2.peer_id, r3.peer_id})
    print(f"\nreplaced {1000 * (trio.current_time() - stopped):.0f} ms after its pings went unanswered")
    assert len(served) >= 2  # a second ping, on a fresh stream, before giving up
    assert r1.peer_id in reservations.backing_off()
    await eventually(lambda: not target.is_connected(r1.peer_id), timeout=5)
    assert all(r1.peer_id.to_base58() not in a for a in reservations.circuit_addrs())


async def test_slow_or_refused_pings_are_no_false_alarm(make_host, nursery, caplog) -> None:
    (slow, _), (refusing, _) = await _relay(make_host, nursery), await _relay(make_host, nursery)
    target = await _target(make_host, nursery)
    candidates = [(h.peer_id, [_tcp(h)]) for h in (slow, refusing)]
    deadline = 0.5
    reservations = Reservations(target.libp2p, lambda: candidates, ping_interval=0.1, ping_deadline=deadline)
    await nursery.start(reservations.serve)
    await _held(reservations, {slow.peer_id, refusing.peer_id})
    kept = dict(reservations._held)
    served: list[int] = []
    caplog.set_level(logging.DEBUG, "lamina.p2p")
    late = deadline + 0.2  # a miss each time, but answered before the second deadline
    slow.libp2p.set_stream_handler(PING_ID, _ping_handler(late, served))
    refusing.libp2p.remove_stream_handler(PING_ID)  # it says "not supported": alive all the same
    await eventually(lambda: len(served) >= 6)  # two pings per check: 3 checks, each with a miss
    misses = [r for r in caplog.records if "did not answer a ping" in r.getMessage()]
    assert misses and all(str(slow.peer_id) in r.getMessage() for r in misses)
    assert reservations._held == kept and all(reservations._held[p] is h for p, h in kept.items())
    assert not reservations.backing_off()


async def test_refusing_candidates_are_skipped_with_backoff(make_host, nursery) -> None:
    relay_host, _ = await _relay(make_host, nursery)
    plain, target = await make_host(), await _target(make_host, nursery)
    dead = p2p.Identity.generate().peer_id
    candidates = [(plain.peer_id, [_tcp(plain)]), (dead, DEAD), (target.peer_id, [DEAD[0]]),
                  (relay_host.peer_id, [_tcp(relay_host)])]
    reservations = Reservations(target.libp2p, lambda: candidates, want=2)
    await nursery.start(reservations.serve)
    broken = Reservations(target.libp2p, lambda: 1 / 0, want=1)  # a failing candidates() is logged
    await nursery.start(broken.serve)
    await _held(reservations, {relay_host.peer_id})
    await eventually(lambda: set(reservations.backing_off()) == {plain.peer_id, dead})
    assert reservations.relays() == [relay_host.peer_id]  # ourselves is never a candidate
    assert broken.relays() == []


async def test_reservations_are_renewed_before_they_expire(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery, RelayLimits(reservation_ttl=2))
    target = await _target(make_host, nursery)
    reservations = Reservations(target.libp2p, lambda: [(relay_host.peer_id, [_tcp(relay_host)])], want=1)
    await nursery.start(reservations.serve)
    await _held(reservations, {relay_host.peer_id})
    first = reservations._held[relay_host.peer_id].expire
    await eventually(lambda: reservations._held[relay_host.peer_id].expire > first, timeout=10)
    assert relay.reservations() == [target.peer_id]


# --- the relay's fixes and limits ------------------------------------------------------------------
async def test_a_disconnected_peer_frees_its_slot(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery, RelayLimits(max_reservations=1))
    first, second = await _target(make_host, nursery), await _target(make_host, nursery)
    where = [_tcp(relay_host)]
    await reserve(first.libp2p, relay_host.peer_id, where)
    with pytest.raises(RelayRefusedError) as refused:
        await reserve(second.libp2p, relay_host.peer_id, where)
    assert refused.value.status == StatusCode.RESOURCE_LIMIT_EXCEEDED
    assert relay.reservations() == [first.peer_id]
    left = trio.current_time()
    await first.disconnect(relay_host.peer_id)
    await eventually(lambda: not relay.reservations())  # py-libp2p kept it for its TTL (an hour)
    print(f"\nslot freed {1000 * (trio.current_time() - left):.0f} ms after the peer left")
    await reserve(second.libp2p, relay_host.peer_id, where)
    assert relay.reservations() == [second.peer_id]


async def test_a_reservation_is_always_for_the_requester(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery)
    client, victim = await make_host(), p2p.Identity.generate().peer_id
    await client.connect(_tcp(relay_host))
    stream = await client.libp2p.new_stream(relay_host.peer_id, [HOP_PROTOCOL_ID])
    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE, peer=PbPeerId(id=victim.to_bytes())))
    with trio.fail_after(10):
        reply = await read_delimited_msg(stream, HopMessage)
    assert reply.status == StatusCode.OK
    assert relay.reservations() == [client.peer_id]


async def _send_garbage(client: p2p.Host, peer: p2p.Host, protocol: str, payload: bytes) -> None:
    stream = await client.libp2p.new_stream(peer.peer_id, [protocol])
    with trio.move_on_after(10):
        try:
            await stream.write(payload)
            await stream.close()  # half-close: then the handler sees the end of what we sent
            while await stream.read(4096):
                pass
        except Exception:
            pass  # a reset is a fine answer to garbage
    await stream.reset()


async def test_garbage_does_not_kill_the_relay_or_the_target(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    await client.connect(_tcp(relay_host))
    await target.connect(_tcp(relay_host))  # the relay sends its garbage on this one
    connect_bad_id = HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=b"\x00garbage"))
    connect_nobody = HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=target.peer_id.to_bytes()))
    stop_bad_id = StopMessage(type=StopMessage.CONNECT, peer=PbPeerId(id=b"\x00garbage"))
    common = [b"\xff" * 64, b"\xff\xff\xff\xff\x0f", encode_varint_prefixed(b"\x08\x07\x12\x03abc"), b"",
              encode_varint_prefixed(HopMessage(type=HopMessage.STATUS).SerializeToString())]
    to_hop = common + [encode_varint_prefixed(m.SerializeToString()) for m in (connect_bad_id, connect_nobody)]
    # a STOP CONNECT with a made-up initiator, then garbage where the Noise handshake should be
    to_stop = common + [encode_varint_prefixed(stop_bad_id.SerializeToString()) + b"\x00" * 200]
    async with trio.open_nursery() as garbage:
        for payload in to_hop:
            garbage.start_soon(_send_garbage, client, relay_host, str(HOP_PROTOCOL_ID), payload)
        for payload in to_stop:
            garbage.start_soon(_send_garbage, relay_host, target, str(STOP_PROTOCOL_ID), payload)
    assert not relay.circuits() and not relay.reservations()
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])  # both still serve
    await dial_circuit(client.libp2p, circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id))
    await _request(client, target)


async def test_the_data_limit_resets_the_circuit_and_a_redial_works(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery, RelayLimits(circuit_bytes=256 * 1024))
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])
    addr = circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id)
    await dial_circuit(client.libp2p, addr)
    await _request(client, target, "small", b"x" * 1000)
    with pytest.raises(p2p.P2PError):
        await _request(client, target, "too big", b"x" * 512 * 1024)
    await eventually(lambda: not client.is_connected(target.peer_id) and not relay.circuits())
    # only that circuit died: the target's connection to the relay (and its slot) is intact
    assert relay.reservations() == [target.peer_id] and target.is_connected(relay_host.peer_id)
    await dial_circuit(client.libp2p, addr)  # a new circuit, a new budget
    await _request(client, target, "small again", b"x" * 1000)


async def test_the_duration_limit_ends_an_idle_circuit(make_host, nursery) -> None:
    relay_host, relay = await _relay(make_host, nursery, RelayLimits(circuit_duration=1))
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])
    await dial_circuit(client.libp2p, circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id))
    await _request(client, target)
    await eventually(lambda: not client.is_connected(target.peer_id) and not target.is_connected(client.peer_id)
                     and not relay.circuits(), timeout=10)


async def test_a_private_network_protects_the_relayed_connection(make_host, nursery, monkeypatch) -> None:
    relay_host, _ = await _relay(make_host, nursery)
    target, client = await _target(make_host, nursery), await _peer(make_host, nursery)
    psk = "ab" * 32
    for host in (relay_host, target, client):  # before any connection
        host.libp2p.get_network().psk = psk
    protected = []
    stock = swarm_module.new_protected_conn

    def counting(raw, key):  # type: ignore[no-untyped-def]
        protected.append((getattr(raw, "is_initiator", None), str(raw.get_transport_addresses()[:1])))
        return stock(raw, key)

    monkeypatch.setattr(swarm_module, "new_protected_conn", counting)  # looked up at call time
    await reserve(target.libp2p, relay_host.peer_id, [_tcp(relay_host)])
    await dial_circuit(client.libp2p, circuit_addr(_tcp(relay_host), relay_host.peer_id, target.peer_id))
    await _request(client, target)
    relayed = [initiator for initiator, addrs in protected if "p2p-circuit" in addrs]
    assert sorted(relayed) == [False, True]  # the target's inbound (py-libp2p) and our outbound
    assert _relayed_only(client, target)


if __name__ == "__main__":
    if sys.argv[1:] == ["relay"]:
        trio.run(_serve_relay_process)
