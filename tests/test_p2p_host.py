"""Real py-libp2p hosts on loopback: requests, sessions, isolation, limits, security, churn."""

from __future__ import annotations

import os
from dataclasses import dataclass

import multiaddr
import pytest
import torch
import trio

import p2p
from _wait import eventually

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@p2p.message("test.host.echo")
@dataclass(frozen=True)
class Echo(p2p.Message):
    text: str
    tensor: p2p.Tensor | None = None


@p2p.message("test.host.other")
@dataclass(frozen=True)
class Other(p2p.Message):
    n: int


async def _pair(make_host) -> tuple[p2p.Host, p2p.Host]:  # type: ignore[no-untyped-def]
    client, server = await make_host(), await make_host()
    await client.connect(server.addrs()[0])
    return client, server


async def echo(peer: object, request: p2p.Message) -> p2p.Message:
    return request


async def echo_session(peer: object, session: p2p.Session) -> None:
    async for msg in session:
        await session.send(msg)


# --- the basics ----------------------------------------------------------------------------------
async def test_unary_request_carries_tensors(make_host) -> None:
    client, server = await _pair(make_host)
    server.set_unary_handler("/test/echo/1", echo)
    t = torch.randn(8, 16, dtype=torch.float32).to(torch.bfloat16)
    reply = await client.request(server.peer_id, "/test/echo/1", Echo("hi", p2p.Tensor.from_torch(t)))
    assert reply.text == "hi" and torch.equal(reply.tensor.to_torch(), t)
    assert server.peer_id in client.connected_peers() and client.peer_id in server.connected_peers()


async def test_session_is_bidirectional_and_ends_with_goodbye(make_host) -> None:
    client, server = await _pair(make_host)

    async def countdown(peer: object, session: p2p.Session) -> None:
        first = await session.receive()
        for i in range(first.n, 0, -1):
            await session.send(Other(i))
        async for msg in session:  # then echo until the client says goodbye
            await session.send(msg)

    server.set_session_handler("/test/countdown/1", countdown)
    async with client.open_session(server.peer_id_str, "/test/countdown/1") as session:
        await session.send(Other(3))
        assert [(await session.receive()).n for _ in range(3)] == [3, 2, 1]
        for i in range(5):
            await session.send(Echo(str(i)))
            assert (await session.receive()).text == str(i)
        await session.send_goodbye()
        with pytest.raises(p2p.EndOfSession):
            await session.receive()
        with pytest.raises(p2p.LocalProtocolError, match="goodbye"):
            await session.send(Echo("late"))


async def test_addrs_for_wildcard_listen_include_loopback_with_real_port(make_host) -> None:
    host = await make_host(listen_addrs=["/ip4/0.0.0.0/tcp/0"])
    addrs = host.addrs()
    loop = [a for a in addrs if a.startswith("/ip4/127.0.0.1/tcp/")]
    assert loop and all(a.endswith(f"/p2p/{host.peer_id_str}") for a in addrs)
    assert int(multiaddr.Multiaddr(loop[0]).value_for_protocol("tcp")) > 0
    other = await make_host()
    assert await other.connect(loop[0]) == host.peer_id


async def test_announce_addrs_replace_listen_addrs(make_host) -> None:
    host = await make_host(announce_addrs=["/ip4/203.0.113.7/tcp/4001"])
    assert host.addrs() == [f"/ip4/203.0.113.7/tcp/4001/p2p/{host.peer_id_str}"]


async def test_requests_dial_peers_known_only_by_remembered_addrs(make_host) -> None:
    client, server = await make_host(), await make_host()
    server.set_unary_handler("/test/echo/1", echo)
    with pytest.raises(p2p.PeerBrokenError, match="no known address"):
        await client.request(server.peer_id, "/test/echo/1", Echo("x"))
    with pytest.raises(p2p.LocalProtocolError, match="belongs to"):
        client.add_addrs(server.peer_id, [client.addrs()[0]])
    client.add_addrs(server.peer_id_str, server.addrs())
    assert (await client.request(server.peer_id, "/test/echo/1", Echo("dialled"))).text == "dialled"


def test_host_config_validation() -> None:
    ident = p2p.Identity.generate()
    with pytest.raises(ValueError, match="not a TCP multiaddr"):
        p2p.HostConfig(identity=ident, listen_addrs=["/ip4/127.0.0.1/udp/0/quic-v1"])
    with pytest.raises(ValueError, match="/p2p/"):
        p2p.HostConfig(identity=ident, bootstrap_peers=["/ip4/127.0.0.1/tcp/4001"])
    with pytest.raises(ValueError, match="dht_mode"):
        p2p.HostConfig(identity=ident, dht_mode="sometimes")


# --- isolation -----------------------------------------------------------------------------------
async def test_handler_exceptions_become_error_frames_and_nothing_else_breaks(make_host) -> None:
    client, server = await _pair(make_host)
    server.set_session_handler("/test/echo-session/1", echo_session)

    async def raising_unary(peer: object, request: p2p.Message) -> p2p.Message:
        raise KeyError("no such layer")

    async def raising_session(peer: object, session: p2p.Session) -> None:
        await session.receive()
        raise RuntimeError("half way")

    async def returns_garbage(peer: object, request: p2p.Message) -> p2p.Message:
        return "not a message"  # type: ignore[return-value]

    server.set_unary_handler("/test/raise/1", raising_unary)
    server.set_session_handler("/test/raise-session/1", raising_session)
    server.set_unary_handler("/test/garbage/1", returns_garbage)

    async with client.open_session(server.peer_id, "/test/echo-session/1") as long_lived:
        await long_lived.send(Echo("before"))
        assert (await long_lived.receive()).text == "before"

        with pytest.raises(p2p.RemoteError) as info:
            await client.request(server.peer_id, "/test/raise/1", Echo("x"))
        assert info.value.code == p2p.ErrorCode.INTERNAL and "KeyError" in info.value.message

        async with client.open_session(server.peer_id, "/test/raise-session/1") as doomed:
            await doomed.send(Echo("go"))
            with pytest.raises(p2p.RemoteError, match="RuntimeError: half way"):
                await doomed.receive()

        with pytest.raises(p2p.RemoteError, match="invalid response"):
            await client.request(server.peer_id, "/test/garbage/1", Echo("x"))

        # the long-lived session and the host are untouched
        await long_lived.send(Echo("after"))
        assert (await long_lived.receive()).text == "after"
    server.set_unary_handler("/test/echo/1", echo)
    assert (await client.request(server.peer_id, "/test/echo/1", Echo("still up"))).text == "still up"


async def test_application_error_codes_reach_the_caller(make_host) -> None:
    client, server = await _pair(make_host)

    async def out_of_memory(peer: object, request: p2p.Message) -> p2p.Message:
        raise p2p.RemoteError("busy", "no KV memory left")

    server.set_unary_handler("/test/busy/1", out_of_memory)
    with pytest.raises(p2p.RemoteError) as info:
        await client.request(server.peer_id, "/test/busy/1", Echo("x"))
    assert (info.value.code, info.value.message) == ("busy", "no KV memory left")
    assert info.value.peer_id == server.peer_id


async def test_a_reply_too_big_to_send_becomes_an_error_frame(make_host) -> None:
    client = await make_host()
    server = await make_host(max_message_size=4096)
    await client.connect(server.addrs()[0])

    async def bloated(peer: object, request: p2p.Message) -> p2p.Message:
        return Echo("big", p2p.Tensor.from_torch(torch.zeros(2048)))  # 8 KiB > 4 KiB frames

    server.set_unary_handler("/test/bloated/1", bloated)
    with pytest.raises(p2p.RemoteError) as info:
        await client.request(server.peer_id, "/test/bloated/1", Echo("x"))
    assert info.value.code == p2p.ErrorCode.INTERNAL and "cannot be sent" in info.value.message


async def test_accepts_restricts_request_types(make_host) -> None:
    client, server = await _pair(make_host)
    server.set_unary_handler("/test/echo-only/1", echo, accepts=Echo)
    assert (await client.request(server.peer_id, "/test/echo-only/1", Echo("ok"))).text == "ok"
    with pytest.raises(p2p.RemoteError) as info:
        await client.request(server.peer_id, "/test/echo-only/1", Other(1))
    assert info.value.code == p2p.ErrorCode.BAD_REQUEST


async def test_unknown_protocol_is_reported_as_unsupported(make_host) -> None:
    client, server = await _pair(make_host)
    with pytest.raises(p2p.UnsupportedProtocolError):
        await client.request(server.peer_id, "/test/nobody-serves-this/1", Echo("x"))


# --- limits and deadlines ------------------------------------------------------------------------
async def test_per_peer_concurrency_limit_answers_busy(make_host) -> None:
    client, server = await _pair(make_host)
    other = await make_host()
    await other.connect(server.addrs()[0])
    release = trio.Event()
    entered = 0

    async def slow(peer: object, request: p2p.Message) -> p2p.Message:
        nonlocal entered
        entered += 1
        await release.wait()
        return request

    server.set_unary_handler("/test/slow/1", slow, max_concurrent_per_peer=2)
    results: list[str] = []

    async def call(host: p2p.Host, text: str) -> None:
        try:
            results.append((await host.request(server.peer_id, "/test/slow/1", Echo(text))).text)
        except p2p.RemoteError as exc:
            results.append(exc.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, client, "a")
        nursery.start_soon(call, client, "b")
        await eventually(lambda: entered >= 2, timeout=5)
        await call(client, "c")  # third from the same peer: refused at once
        assert results == ["busy"]
        nursery.start_soon(call, other, "d")  # another peer has its own budget
        await eventually(lambda: entered >= 3, timeout=5)
        release.set()
    assert sorted(results) == ["a", "b", "busy", "d"]


async def test_caller_deadline_cancels_the_remote_handler(make_host) -> None:
    client, server = await _pair(make_host)
    started, cancelled = trio.Event(), trio.Event()

    async def forever(peer: object, request: p2p.Message) -> p2p.Message:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server.set_unary_handler("/test/forever/1", forever)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(1):
            await client.request(server.peer_id, "/test/forever/1", Echo("x"))
    assert started.is_set()
    with trio.fail_after(5):
        await cancelled.wait()  # the client's reset reached the server and stopped the work


async def test_a_send_cut_by_a_deadline_poisons_only_that_session(make_host) -> None:
    client, server = await _pair(make_host)
    server.set_session_handler("/test/echo-session/1", echo_session)
    big = p2p.Tensor.from_torch(torch.zeros(8 * 1024 * 1024))
    async with client.open_session(server.peer_id, "/test/echo-session/1") as session:
        with trio.move_on_after(0.01):
            await session.send(Echo("big", big))
        with pytest.raises(p2p.LocalProtocolError, match="cancelled mid-frame"):
            await session.send(Echo("next"))
    server.set_unary_handler("/test/echo/1", echo)
    assert (await client.request(server.peer_id, "/test/echo/1", Echo("fine"))).text == "fine"


# --- security ------------------------------------------------------------------------------------
@pytest.mark.parametrize("offer", ["plaintext", "secio"])
async def test_a_dialer_without_noise_is_refused(make_host, offer: str) -> None:
    import libp2p.security.secio.transport as secio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    server = await make_host()
    server.set_unary_handler("/test/echo/1", echo)
    kp = create_new_key_pair()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    sec_opt = {
        "plaintext": {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)},
        "secio": {TProtocol(secio.ID): secio.Transport(kp)},
    }[offer]
    weak = new_host(key_pair=kp, listen_addrs=listen, sec_opt=sec_opt)
    target = multiaddr.Multiaddr(server.addrs()[0])
    async with weak.run(listen):
        with pytest.raises(Exception) as info:
            with trio.fail_after(10):
                await weak.connect(PeerInfo(ID.from_base58(target.value_for_protocol("p2p")), [target]))
        assert not isinstance(info.value, trio.TooSlowError)  # refused during negotiation
        assert weak.get_connected_peers() == []
        await weak.close()
    assert server.connected_peers() == []
    client = await make_host()  # the host is still up and serving
    await client.connect(server.addrs()[0])
    assert (await client.request(server.peer_id, "/test/echo/1", Echo("ok"))).text == "ok"


# --- connection hooks ------------------------------------------------------------------------------
async def test_peer_connected_hooks_run_isolated_on_both_sides(make_host) -> None:
    a, b = await make_host(), await make_host()
    seen: dict[str, list] = {"a": [], "b": []}
    both = trio.Event()

    async def broken(peer: object) -> None:
        raise RuntimeError("hook bug")

    def record(name: str):  # type: ignore[no-untyped-def]
        async def hook(peer: object) -> None:
            seen[name].append(peer)
            if seen["a"] and seen["b"]:
                both.set()

        return hook

    a.on_peer_connected(broken)
    a.on_peer_connected(record("a"))
    b.on_peer_connected(record("b"))
    await a.connect(b.addrs()[0])
    with trio.fail_after(5):
        await both.wait()
    assert seen == {"a": [b.peer_id], "b": [a.peer_id]}


# --- resource hygiene ----------------------------------------------------------------------------
def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


@pytest.mark.slow  # ~12 s
async def test_200_open_close_cycles_leave_fds_and_tasks_flat() -> None:
    """200 client hosts open, connect, request and close (10 at a time: py-libp2p spends
    ~0.2 s sleeping in every connection close); the long-lived server ends where it began."""
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=LOOPBACK, enable_dht=False, enable_gossip=False)
    async with p2p.open_host(config) as server:
        server.set_unary_handler("/test/echo/1", echo)
        identities = [p2p.Identity.generate() for _ in range(10)]

        async def cycle(identity: p2p.Identity) -> None:
            cfg = p2p.HostConfig(identity=identity, listen_addrs=LOOPBACK, enable_dht=False, enable_gossip=False)
            async with p2p.open_host(cfg) as client:
                await client.connect(server.addrs()[0])
                assert (await client.request(server.peer_id, "/test/echo/1", Echo("x"))).text == "x"

        async def wave() -> None:
            async with trio.open_nursery() as nursery:
                for identity in identities:
                    nursery.start_soon(cycle, identity)
            # the server notices every close
            await eventually(lambda: not server.connected_peers(), timeout=5, interval=0.005)

        await wave()  # warm up caches and lazily created objects
        fds, tasks = _fd_count(), _task_count()
        for _ in range(20):
            await wave()
        # the last wave's stragglers (identify tasks, closing streams) may take a moment under
        # load; a leak never settles
        await eventually(lambda: _fd_count() <= fds + 2 and _task_count() <= tasks + 2, timeout=10, interval=0.05,
                         what=lambda: f"fds {_fd_count()} <= {fds} + 2 and tasks {_task_count()} <= {tasks} + 2")


def test_stream_endings_wrapped_in_groups_are_recognized() -> None:
    from p2p._host import _STREAM_ENDINGS, _only

    gone = p2p.PeerBrokenError("the client reset the stream")
    assert _only(gone, _STREAM_ENDINGS)
    assert _only(ExceptionGroup("tasks", [gone, ExceptionGroup("inner", [p2p.EndOfSession("bye")])]), _STREAM_ENDINGS)
    assert not _only(ExceptionGroup("tasks", [gone, KeyError("a bug")]), _STREAM_ENDINGS)


async def test_expiring_set_forgets_members_after_their_ttl(mock_clock) -> None:
    memory = p2p.ExpiringSet(ttl=10.0, max_size=3)
    memory.add(("peer", "10.0.0.1"))
    mock_clock.jump(9.9)
    assert ("peer", "10.0.0.1") in memory and ("peer", "10.0.0.2") not in memory
    memory.add(("peer", "10.0.0.1"))       # a new failure renews it
    mock_clock.jump(9.9)
    assert ("peer", "10.0.0.1") in memory
    mock_clock.jump(0.2)
    assert ("peer", "10.0.0.1") not in memory
    # a full memory drops its stale members all at once, so it stays bounded
    for key in "abc":
        memory.add(key)
    mock_clock.jump(11)
    memory.add("d")
    assert len(memory._until) == 1 and "d" in memory


async def test_a_port_in_use_is_refused(make_host) -> None:
    """py-libp2p listens with SO_REUSEPORT: without a check, a second host on the same port
    would listen too and silently take half of the first one's inbound connections."""
    first = await make_host()
    port = first.addrs()[0].split("/tcp/")[1].split("/")[0]
    with pytest.raises(OSError, match="in use"):
        await make_host(listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"])
