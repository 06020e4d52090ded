"""Direct lanes (p2p/_lane.py) between real hosts on loopback: a session moves to its own TCP
connection when both ends ask for it, falls back to the libp2p stream whenever it cannot, and
an attacker on the lane port gets nothing."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

import pytest
import torch
import trio
import trio.testing

import p2p
from _wait import eventually
from p2p import _lane

PROTO = "/test/lane-echo/1"


@p2p.message("test.lane.data")
@dataclass(frozen=True)
class Data(p2p.Message):
    n: int
    tensor: p2p.Tensor | None = None


class Echo:
    """A lane-capable echo handler that records the transport of every session it served."""

    def __init__(self) -> None:
        self.transports: list[str] = []

    async def __call__(self, peer: object, session: p2p.Session) -> None:
        self.transports.append(session.transport)
        async for msg in session:
            await session.send(msg)


async def _pair(make_host, handler=None, **server_kwargs):  # type: ignore[no-untyped-def]
    """A client connected to a server whose lane-capable `PROTO` handler is `handler` (an
    `Echo` by default)."""
    client, server = await make_host(), await make_host(**server_kwargs)
    await client.connect(server.addrs()[0])
    handler = handler or Echo()
    server.set_session_handler(PROTO, handler, lane=True)
    return client, server, handler


async def _round_trips(session: p2p.Session, count: int = 5) -> None:
    for i in range(count):
        t = torch.randn(1, 3, 16)
        await session.send(Data(i, p2p.Tensor.from_torch(t)))
        reply = await session.receive()
        assert reply.n == i and torch.equal(reply.tensor.to_torch(), t)


async def test_session_moves_to_a_lane(make_host) -> None:
    client, server, handler = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await _round_trips(session)
        # a message bigger than one lane record (256 KiB) arrives whole and equal
        big = torch.randn(3, 1000, 100)
        await session.send(Data(99, p2p.Tensor.from_torch(big)))
        reply = await session.receive()
        assert reply.n == 99 and torch.equal(reply.tensor.to_torch(), big)
    assert handler.transports == ["lane"]
    assert not server.lanes._tickets  # the ticket was used once and is gone


# -- interrupt_receive: the same on both transports (a lane wakes its socket read, a libp2p
# stream its receiver waiting on the reader task's queue) --------------------------------------
@pytest.mark.parametrize("lane", [True, False], ids=["lane", "libp2p"])
async def test_a_receive_can_be_interrupted_and_the_session_goes_on(make_host, lane: bool) -> None:
    client, server, _ = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO, lane=lane) as session:
        assert session.transport == ("lane" if lane else "libp2p")
        outcome: list[object] = []

        async def receive() -> None:
            try:
                outcome.append(await session.receive())
            except p2p.ReceiveInterrupted:
                outcome.append("interrupted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()  # the receive waits (socket or queue)
            session.interrupt_receive()
        assert outcome == ["interrupted"]
        await _round_trips(session)  # the stream and its frames are intact
        session.interrupt_receive()  # with no receive under way: the next one raises at once
        with pytest.raises(p2p.ReceiveInterrupted):
            await session.receive()
        session.interrupt_receive()
        session.clear_interrupt()
        await _round_trips(session, 1)
        assert session.failed is None


class Burst:
    """Answers a `Data(n)` with n messages at once, then echoes."""

    async def __call__(self, peer: object, session: p2p.Session) -> None:
        async for msg in session:
            for i in range(msg.n):
                await session.send(Data(100 + i))


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "libp2p"])
async def test_an_interrupt_leaves_arrived_messages_for_later_receives(make_host, lane: bool) -> None:
    client, server, _ = await _pair(make_host, Burst())
    async with client.open_session(server.peer_id, PROTO, lane=lane) as session:
        await session.send(Data(3))
        # all three are in (a lane: its watchdog took them in; libp2p: its reader queued them)
        await eventually(lambda: len(session._pending) == 3 if lane
                         else session._transport._queue_receive.statistics().current_buffer_used == 3, timeout=10)
        session.interrupt_receive()
        with trio.fail_after(10):
            # a receive that need not wait returns what arrived, in order; then the next raises
            assert [await session.receive() for _ in range(3)] == [Data(100), Data(101), Data(102)]
            with pytest.raises(p2p.ReceiveInterrupted):
                await session.receive()
            await session.send(Data(1))
            assert await session.receive() == Data(100)
        assert session.failed is None


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "libp2p"])
async def test_an_interrupt_cleared_before_the_receive_wakes_is_forgotten(make_host, lane: bool) -> None:
    client, server, _ = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO, lane=lane) as session:
        got: list[p2p.Message] = []

        async def receive() -> None:
            got.append(await session.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            session.interrupt_receive()  # wakes the receive...
            session.clear_interrupt()  # ...which finds nothing to report and waits on
            await trio.testing.wait_all_tasks_blocked()
            assert not got
            await session.send(Data(5))
        assert got == [Data(5)] and session.failed is None


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "libp2p"])
async def test_an_interrupted_receive_after_the_peer_left_says_so(make_host, lane: bool) -> None:
    async def goodbye_at_once(peer: object, session: p2p.Session) -> None:
        return

    client, server, _ = await _pair(make_host, goodbye_at_once)
    async with client.open_session(server.peer_id, PROTO, lane=lane) as session:
        await eventually(lambda: session._rx_ended, timeout=10)
        session.interrupt_receive()
        with pytest.raises(p2p.EndOfSession):  # the end of the session, not the interrupt
            await session.receive()


async def test_concurrent_receivers_on_libp2p_see_one_interrupt(make_host) -> None:
    client, server, _ = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO) as session:
        outcomes: list[object] = []

        async def receive() -> None:
            try:
                outcomes.append(await session.receive())
            except p2p.ReceiveInterrupted:
                outcomes.append("interrupted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            session.interrupt_receive()
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == ["interrupted"]  # the other one waits on
            await session.send(Data(9))
        assert outcomes == ["interrupted", Data(9)]


async def test_a_client_that_does_not_ask_stays_on_libp2p(make_host) -> None:
    client, server, handler = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO) as session:
        assert session.transport == "libp2p"
        await _round_trips(session)  # the first message was peeked at and handed back
    assert handler.transports == ["libp2p"]


async def test_a_server_without_lanes_answers_unavailable(make_host) -> None:
    client, server, handler = await _pair(make_host, enable_lanes=False)
    assert server.lanes is None
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "libp2p"
        await _round_trips(session)
    assert handler.transports == ["libp2p"]


async def test_an_unreachable_lane_falls_back_to_libp2p(make_host, monkeypatch) -> None:
    client, server, handler = await _pair(make_host)
    # the invite names a port where nothing listens (a firewall or NAT in real life)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    real_invite = server.lanes.invite

    invites = []

    def invite_to_closed_port():  # type: ignore[no-untyped-def]
        invite, ticket = real_invite()
        invites.append(ticket)
        return _lane.LaneInvite(closed_port, invite.ticket, invite.key), ticket

    monkeypatch.setattr(server.lanes, "invite", invite_to_closed_port)
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "libp2p"
        await _round_trips(session)
    assert handler.transports == ["libp2p"]
    assert not server.lanes._tickets  # the unused ticket was withdrawn
    # the client remembers: its next session does not ask for a lane there again
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "libp2p"
        await _round_trips(session)
    assert len(invites) == 1 and handler.transports == ["libp2p", "libp2p"]


async def _raw_lane_connection(port: int, payload: bytes) -> bytes:
    """Connect to a lane port, send `payload`, return whatever comes back before EOF (or a
    reset: closing with our extra bytes unread makes the kernel send one)."""
    with trio.fail_after(_lane.LANE_HELLO_DEADLINE + 5):
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(payload)
        received = b""
        try:
            while chunk := await sock.receive_some(4096):
                received += chunk
        except trio.BrokenResourceError:
            pass
        await sock.aclose()
    return received


async def test_the_lane_port_ignores_strangers(make_host) -> None:
    client, server, handler = await _pair(make_host)
    port = server.lanes.port
    invite, _ticket = server.lanes.invite()
    # a wrong ticket, a wrong magic, garbage: closed without a byte, the real ticket untouched
    assert await _raw_lane_connection(port, _lane.LANE_MAGIC + os.urandom(_lane.TICKET_SIZE)) == b""
    assert await _raw_lane_connection(port, b"GET / HTTP/1.1\r\n\r\n" + bytes(20)) == b""
    assert invite.ticket in server.lanes._tickets
    # the host serves on as before
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await _round_trips(session)


async def test_a_forged_record_breaks_only_that_session(make_host) -> None:
    client, server, handler = await _pair(make_host)
    async with client.open_session(server.peer_id, PROTO, lane=True) as victim:
        assert victim.transport == "lane"
        await _round_trips(victim, 1)
        # an attacker who can write into the TCP connection but lacks the key: a record with
        # a valid length and a bad tag
        forged = b"\x00" * 40
        await victim._stream._sock.send_all(struct.pack(">I", len(forged)) + forged)
        with pytest.raises(p2p.PeerBrokenError):
            with trio.fail_after(10):
                await victim.receive()  # the server dropped the lane: no goodbye
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        await _round_trips(session)
    assert handler.transports == ["lane", "lane"]


async def test_a_truncated_record_is_a_broken_lane_not_a_clean_end() -> None:
    key_c, key_s = os.urandom(32), os.urandom(32)
    left, right = socket.socketpair()
    sender = _lane.LaneStream(trio.SocketStream(trio.socket.from_stdlib_socket(left)), key_c, key_s)
    receiver = _lane.LaneStream(trio.SocketStream(trio.socket.from_stdlib_socket(right)), key_s, key_c)
    sealed = sender.seal(b"hello")
    await sender._sock.send_all(sealed)
    assert await receiver.read() == b"hello"
    await sender._sock.send_all(sender.seal(b"world")[:-3])  # cut mid-record, then EOF
    await sender._sock.send_eof()
    with pytest.raises(trio.BrokenResourceError):
        await receiver.read()
    await sender.reset()
    await receiver.reset()


async def test_lane_sessions_carry_many_concurrent_sessions(make_host) -> None:
    client, server, handler = await _pair(make_host)

    async def one() -> None:
        async with client.open_session(server.peer_id, PROTO, lane=True) as session:
            assert session.transport == "lane"
            await _round_trips(session, 10)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert handler.transports == ["lane"] * 8


# -- direct reads: on a lane, `receive` reads the socket itself (no reader task) ---------------
@pytest.mark.parametrize("lane", [True, False], ids=["lane", "libp2p"])
async def test_messages_before_invalid_bytes_arrive_then_the_error(make_host, lane: bool) -> None:
    async def valid_then_garbage(peer: object, session: p2p.Session) -> None:
        await session.receive()
        # one write: a whole valid frame, then bytes that are no frame (a 4 GB length prefix)
        await session._stream.write(b"".join(p2p._wire.encode(Data(7))) + b"\xff" * 16)
        await trio.sleep_forever()

    client, server, _ = await _pair(make_host, valid_then_garbage)
    async with client.open_session(server.peer_id, PROTO, lane=lane) as session:
        assert session.transport == ("lane" if lane else "libp2p")
        await session.send(Data(1))
        with trio.fail_after(10):
            assert await session.receive() == Data(7)
            with pytest.raises(p2p.RemoteProtocolError):
                await session.receive()


async def test_a_lane_takes_in_messages_and_the_goodbye_while_nobody_receives(make_host) -> None:
    async def two_then_goodbye(peer: object, session: p2p.Session) -> None:
        await session.receive()
        await session.send(Data(1))
        await session.send(Data(2))

    client, server, _ = await _pair(make_host, two_then_goodbye)
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await session.send(Data(0))
        # the watchdog's poll takes them in: no receive call
        await eventually(lambda: session._rx_ended, timeout=10)
        assert session.failed is None
        assert [await session.receive(), await session.receive()] == [Data(1), Data(2)]
        with pytest.raises(p2p.EndOfSession):
            await session.receive()


async def test_a_lane_notices_a_reset_while_nobody_receives(make_host) -> None:
    async def reset(peer: object, session: p2p.Session) -> None:
        await session.receive()
        await session._stream.reset()
        await trio.sleep_forever()

    client, server, _ = await _pair(make_host, reset)
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await session.send(Data(0))
        await eventually(lambda: session.failed is not None, timeout=10)
        assert isinstance(session.failed, p2p.PeerBrokenError)
        # seen by the watchdog reading (each 0.2 s), before a heartbeat (after 0.5 s quiet)
        # would have hit the reset while writing
        assert "stream from" in str(session.failed)
        with pytest.raises(p2p.PeerBrokenError):
            await session.receive()
        with pytest.raises(p2p.PeerBrokenError):
            await session.send(Data(1))


async def test_a_flood_of_idle_connections_is_capped_and_sessions_go_on(make_host) -> None:
    client, server, handler = await _pair(make_host)
    port = server.lanes.port
    idle = []
    try:
        for _ in range(_lane.LANE_MAX_HANDSHAKES):  # connect and say nothing
            idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        await eventually(lambda: server.lanes.handshakes >= _lane.LANE_MAX_HANDSHAKES, timeout=10)
        # one more: closed at once, unread
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):  # well before the hello deadline (5 s) would close it
            assert await extra.receive_some(100) == b""
        assert server.lanes.refused >= 1
        await extra.aclose()
        # a session meanwhile: its lane connection is refused, so it carries on over libp2p
        async with client.open_session(server.peer_id, PROTO, lane=True) as session:
            assert session.transport == "libp2p"
            await _round_trips(session, 2)
    finally:
        for sock in idle:
            await sock.aclose()
    await eventually(lambda: server.lanes.handshakes == 0, timeout=10)  # the flood gone, lanes work again
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await _round_trips(session, 2)
