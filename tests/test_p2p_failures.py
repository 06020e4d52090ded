"""Failures of real peer processes: SIGKILL mid-transfer, SIGSTOP (frozen), in both directions,
on libp2p streams and on direct lanes (where `receive` reads the socket itself).

The peer is this file run as a script (``python tests/test_p2p_failures.py ROLE``): it starts a
host, prints its address on stdout, and serves. The test waits for that line, never a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

import p2p
from _wait import eventually

pytestmark = pytest.mark.slow  # every test starts a peer process
BIG = 96 * 1024 * 1024  # ~0.5-1 s on loopback: long enough to be cut in the middle


@p2p.message("test.fail.ask")
@dataclass(frozen=True)
class Ask(p2p.Message):
    nbytes: int


@p2p.message("test.fail.blob")
@dataclass(frozen=True)
class Blob(p2p.Message):
    data: p2p.Tensor


def _blob(nbytes: int) -> Blob:
    return Blob(p2p.Tensor("uint8", (nbytes,), bytearray(nbytes)))


# --- the peer process ------------------------------------------------------------------------------
async def _serve_peer() -> None:
    async def stream_to_client(peer: object, session: p2p.Session) -> None:
        async for ask in session:
            blob = _blob(ask.nbytes)
            print("sending", flush=True)
            await session.send(blob)

    async def sink(peer: object, session: p2p.Session) -> None:
        async for msg in session:
            print("received", flush=True)

    async def echo(peer: object, session: p2p.Session) -> None:
        async for msg in session:
            await session.send(msg)

    async def slow_unary(peer: object, request: p2p.Message) -> p2p.Message:
        print("handling", flush=True)
        await trio.sleep_forever()
        raise AssertionError

    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], enable_dht=False, enable_gossip=False)
    async with p2p.open_host(config) as host:
        host.set_session_handler("/test/stream-to-client/1", stream_to_client, lane=True)
        host.set_session_handler("/test/sink/1", sink, lane=True)
        host.set_session_handler("/test/echo/1", echo, lane=True)
        host.set_unary_handler("/test/slow/1", slow_unary)
        print(host.addrs()[0], flush=True)
        await trio.sleep_forever()


# --- helpers -----------------------------------------------------------------------------------------
class Peer:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def readline(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise EOFError("peer process exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)


@asynccontextmanager
async def peer_process() -> AsyncIterator[tuple[Peer, str]]:
    process = await trio.lowlevel.open_process([sys.executable, __file__, "serve"], stdout=subprocess.PIPE)
    peer = Peer(process)
    try:
        with trio.fail_after(30):
            addr = await peer.readline()
        yield peer, addr
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            await process.wait()


@pytest.fixture
async def host(nursery) -> p2p.Host:  # type: ignore[no-untyped-def]
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], enable_dht=False, enable_gossip=False)
    return await nursery.start(p2p.serve_host, config)


@pytest.fixture(params=["libp2p", "lane"])
def transport(request) -> str:  # type: ignore[no-untyped-def]
    return request.param


# --- SIGKILL -----------------------------------------------------------------------------------------
async def test_sigkill_mid_transfer_is_peer_broken_never_a_truncated_message(host: p2p.Host, transport: str) -> None:
    async with peer_process() as (peer, addr):
        peer_id = await host.connect(addr)
        async with host.open_session(peer_id, "/test/stream-to-client/1", lane=transport == "lane") as session:
            assert session.transport == transport
            outcome: list[BaseException | p2p.Message] = []

            async def receive() -> None:
                try:
                    outcome.append(await session.receive())
                except p2p.P2PError as exc:
                    outcome.append(exc)

            killed_at = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await session.send(Ask(BIG))
                assert await peer.readline() == "sending"
                # bytes of the frame are arriving (polled often: the frame takes ~0.5-1 s)
                await eventually(lambda: session._proto.in_frame, timeout=10, interval=0.001)
                peer.signal(signal.SIGKILL)
                killed_at = trio.current_time()
                await eventually(lambda: bool(outcome), timeout=5, interval=0.001)
            assert trio.current_time() - killed_at < 2
            error = outcome[0]
            assert isinstance(error, p2p.PeerBrokenError), f"a cut-off message was delivered: {error!r}"
            assert "mid-frame" in str(error) or "broke" in str(error)
            with pytest.raises(p2p.PeerBrokenError):  # and it stays broken
                await session.receive()


async def test_sigkill_while_we_send_raises_peer_broken(host: p2p.Host, transport: str) -> None:
    async with peer_process() as (peer, addr):
        peer_id = await host.connect(addr)
        async with host.open_session(peer_id, "/test/sink/1", lane=transport == "lane") as session:
            assert session.transport == transport
            await session.send(_blob(1024))
            assert await peer.readline() == "received"
            with pytest.raises(ExceptionGroup) as info:
                with trio.fail_after(10):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(session.send, _blob(BIG))
                        await eventually(lambda: session._write_progress_at is not None, timeout=10,
                                         interval=0.001)
                        peer.signal(signal.SIGKILL)
            assert info.group_contains(p2p.PeerBrokenError)


async def test_sigkill_during_a_request_raises_peer_broken(host: p2p.Host) -> None:
    async with peer_process() as (peer, addr):
        peer_id = await host.connect(addr)
        with pytest.raises(ExceptionGroup) as info:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(host.request, peer_id, "/test/slow/1", Ask(1))
                    assert await peer.readline() == "handling"
                    peer.signal(signal.SIGKILL)
        assert info.group_contains(p2p.PeerBrokenError)


# --- SIGSTOP -----------------------------------------------------------------------------------------
async def test_sigstopped_peer_is_detected_within_3s_while_we_wait(host: p2p.Host, transport: str) -> None:
    async with peer_process() as (peer, addr):
        peer_id = await host.connect(addr)
        async with host.open_session(peer_id, "/test/echo/1", lane=transport == "lane") as session:
            assert session.transport == transport
            await session.send(Ask(1))
            assert await session.receive() == Ask(1)
            peer.signal(signal.SIGSTOP)
            stopped_at = trio.current_time()
            with pytest.raises(p2p.PeerFrozenError):
                with trio.fail_after(10):
                    await session.receive()
            print(f"frozen peer detected after {trio.current_time() - stopped_at:.2f}s")
            assert trio.current_time() - stopped_at < 3.0


async def test_sigstopped_peer_is_detected_within_3s_while_we_send(host: p2p.Host, transport: str) -> None:
    async with peer_process() as (peer, addr):
        peer_id = await host.connect(addr)
        async with host.open_session(peer_id, "/test/sink/1", lane=transport == "lane") as session:
            assert session.transport == transport
            await session.send(_blob(1024))
            assert await peer.readline() == "received"
            peer.signal(signal.SIGSTOP)
            stopped_at = trio.current_time()
            with pytest.raises(p2p.PeerFrozenError):
                with trio.fail_after(10):
                    for _ in range(100):  # far more than the socket and yamux windows hold
                        await session.send(_blob(4 * 1024 * 1024))
            print(f"frozen peer detected after {trio.current_time() - stopped_at:.2f}s")
            assert trio.current_time() - stopped_at < 3.0


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        trio.run(_serve_peer)
