"""The attacker of tests/test_adversarial_limits.py, in a process of its own (so the test's event
loop, which runs the honest client, is not the one attacking):

    python tests/_attacker.py NODE_MULTIADDR

It reads one JSON command a line on stdin and answers each with one JSON line on stdout:
``{"attack": "sessions" | "length" | "oversized" | "slow"}`` run one attack and report what the
node answered; ``{"attack": "flood" | "load", ...}`` start one in the background (answered once
it holds its ground); ``{"attack": "stop"}`` stops those and reports their counts. Every attack
uses peers of its own (fresh identities: fresh per-peer limits). It holds resources and gets
refused; it paces itself, and runs at a low priority, rather than burn the cores it shares.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from libp2p.custom_types import TProtocol

import p2p
from p2p._lane import LaneHello, LaneInvite
from pipeline.protocol import (INFERENCE_PROTOCOL, INFO_PROTOCOL, InfoRequest, OpenSession, SessionOpened, Step,
                               new_session_id)

# the node's limits (tests/test_adversarial_limits.py starts it with them)
HIDDEN = 256  # the tiny model's hidden size
SESSIONS_PER_PEER = 4
TOKENS_PER_PEER = 2048
MAX_LENGTH = 512
OPEN_RATE = 5.0
SLOW_BOUND = p2p.constants.FRAME_GRACE + 3.0  # a trickling stream is cut by then
READ_DEADLINE = 15.0  # any answer the attacker waits for


@asynccontextmanager
async def _peer(addr: str) -> AsyncIterator[tuple[p2p.Host, object, str]]:
    """A host with a fresh identity (a peer of its own, with fresh per-peer limits), connected
    to the node: (host, node's peer id, model hash)."""
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                            enable_dht=False, enable_gossip=False, enable_lanes=False)
    async with p2p.open_host(config) as host:
        with trio.fail_after(READ_DEADLINE):
            while True:  # (right after a flood, the node may still hold this IP's handshake slots)
                try:
                    peer = await host.connect(addr)
                    break
                except p2p.PeerError:
                    await trio.sleep(0.5)
            info = await host.request(peer, INFO_PROTOCOL, InfoRequest())
        yield host, peer, info.model


async def _open(stack: AsyncExitStack, host: p2p.Host, peer: object, model: str, *, max_length: int = 16,
                batch: int = 1) -> str:
    """Open one inference session, kept open in `stack`: "opened", or "code: message"."""
    session = await stack.enter_async_context(host.open_session(peer, INFERENCE_PROTOCOL))
    try:
        with trio.fail_after(READ_DEADLINE):
            await session.send(OpenSession(new_session_id(), model, 0, 8, max_length, batch, "float32"))
            reply = await session.receive()
    except p2p.RemoteError as exc:
        return f"{exc.code}: {exc.message}"
    return "opened" if isinstance(reply, SessionOpened) else f"unexpected {type(reply).__name__}"


async def _write(stream, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    """One write, never cancelled halfway (py-libp2p then corrupts the whole connection); False
    when the node has reset the stream."""
    with trio.CancelScope(shield=True):
        try:
            await stream.write(data)
        except Exception:
            return False
    return True


async def _raw(host: p2p.Host, peer: object, protocol: str, first: bytes, then: bytes | None = None,
               *, slow: bool = False) -> dict:
    """Write `first` on a raw stream; with `then`, wait for SessionOpened and write `then` too (one
    byte a second when `slow`); read to the stream's end. Returns the error frame the node
    answered with and how long after the last write began it closed the stream."""
    stream = await host.libp2p.new_stream(peer, [TProtocol(protocol)])
    seen: dict = {"error": None}
    opened, ended = trio.Event(), trio.Event()
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            decoder = p2p.FrameDecoder()
            try:
                while chunk := await stream.read(65536):
                    for msg in decoder.feed(chunk):
                        if isinstance(msg, SessionOpened):
                            opened.set()
                        elif isinstance(msg, p2p.ErrorMessage):
                            seen["error"] = [msg.code, msg.message]
            except Exception:
                pass  # the end, or a reset: the node is done with us
            seen["ended"] = time.perf_counter()
            ended.set()
            opened.set()

        nursery.start_soon(read)
        with trio.move_on_after(READ_DEADLINE + SLOW_BOUND):
            last = first if then is None else then
            if then is not None and await _write(stream, first):
                await opened.wait()
            began = time.perf_counter()
            # (pieces of one Noise message each, like a session's writes)
            step = 1 if slow else p2p.constants.WRITE_CHUNK
            for i in range(0, len(last), step):
                if ended.is_set() or not await _write(stream, last[i:i + step]):
                    break
                if slow:
                    with trio.move_on_after(1.0):
                        await ended.wait()
            await ended.wait()
        nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        try:
            await stream.reset()
        except Exception:
            pass
    return {"error": seen["error"], "closed_after": seen.get("ended", time.perf_counter()) - began}


def _open_frame(model: str, max_length: int = 16) -> bytes:
    return p2p.encode_bytes(OpenSession(new_session_id(), model, 0, 8, max_length, 1, "float32"))


def _step_frame(tokens: int) -> bytes:
    return p2p.encode_bytes(Step("0" * 32, 1, 0, p2p.Tensor("float32", (1, tokens, HIDDEN), bytes(4 * tokens * HIDDEN))))


async def attack_sessions(addr: str) -> dict:
    """One peer holds sessions until refused; another asks for its whole KV share, then more;
    a third opens and closes sessions in a loop."""
    out: dict = {}
    async with _peer(addr) as (host, peer, model), AsyncExitStack() as stack:
        out["hold"] = [await _open(stack, host, peer, model) for _ in range(SESSIONS_PER_PEER + 2)]
    async with _peer(addr) as (host, peer, model), AsyncExitStack() as stack:
        out["share"] = [await _open(stack, host, peer, model, max_length=MAX_LENGTH, batch=TOKENS_PER_PEER // MAX_LENGTH),
                        await _open(stack, host, peer, model)]
    async with _peer(addr) as (host, peer, model):
        loop, began = [], time.perf_counter()
        for _ in range(40):
            start = time.perf_counter()
            async with AsyncExitStack() as stack:
                result = await _open(stack, host, peer, model)
            loop.append((result, time.perf_counter() - start))
        out["loop"], out["loop_seconds"] = loop, time.perf_counter() - began
    return out


async def attack_length(addr: str) -> dict:
    async with _peer(addr) as (host, peer, model), AsyncExitStack() as stack:
        return {"refused": [await _open(stack, host, peer, model, max_length=MAX_LENGTH + 1),
                            await _open(stack, host, peer, model, max_length=1 << 20, batch=64)]}


async def attack_oversized(addr: str, attempts: int = 0) -> dict:
    """A first frame over the open limit; a Step frame over what its session can use (its
    length prefix and 64 KiB); then `attempts` more of those (200 KiB sent each), four at a
    time, eight from each peer (one peer alone would meet its open rate)."""
    async with _peer(addr) as (host, peer, model):
        out = {"before_open": await _raw(host, peer, INFERENCE_PROTOCOL, struct.pack("<I", 1 << 20) + bytes(4096)),
               "after_open": await _raw(host, peer, INFERENCE_PROTOCOL, _open_frame(model),
                                        struct.pack("<I", 100 << 20) + bytes(65536))}
    results: list[dict] = []
    for _ in range(attempts // 8):
        async with _peer(addr) as (host, peer, model):
            for _ in range(2):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        async def one() -> None:
                            results.append(await _raw(host, peer, INFERENCE_PROTOCOL, _open_frame(model),
                                                      struct.pack("<I", 100 << 20) + bytes(200 * 1024)))
                        nursery.start_soon(one)
    out["many_refused"] = sum(1 for r in results if r["error"] and "exceeds" in r["error"][1])
    return out


async def _idle(host: p2p.Host, peer: object, protocol: str) -> dict:
    """A real session (heartbeats) that never sends its first message."""
    began = time.perf_counter()
    try:
        async with host.open_session(peer, protocol) as session:
            with trio.fail_after(READ_DEADLINE):
                await session.receive()
    except p2p.RemoteError as exc:
        return {"error": [exc.code, exc.message], "closed_after": time.perf_counter() - began}
    except p2p.P2PError as exc:
        return {"error": ["?", repr(exc)], "closed_after": time.perf_counter() - began}
    return {"error": None, "closed_after": time.perf_counter() - began}


async def attack_slow(addr: str) -> dict:
    out: dict = {}
    async with _peer(addr) as (host, peer, model):
        async def run(name: str, coro) -> None:  # type: ignore[no-untyped-def]
            out[name] = await coro

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "open_frame", _raw(host, peer, INFERENCE_PROTOCOL, _open_frame(model), slow=True))
            nursery.start_soon(run, "info_frame", _raw(host, peer, INFO_PROTOCOL, p2p.encode_bytes(InfoRequest()),
                                                       slow=True))
            nursery.start_soon(run, "step_frame", _raw(host, peer, INFERENCE_PROTOCOL, _open_frame(model),
                                                       _step_frame(1), slow=True))
            nursery.start_soon(run, "idle_session", _idle(host, peer, INFERENCE_PROTOCOL))
            nursery.start_soon(run, "idle_unary", _idle(host, peer, INFO_PROTOCOL))
        async with AsyncExitStack() as stack:  # the same peer: its slots are free again
            out["after"] = [await _open(stack, host, peer, model) for _ in range(SESSIONS_PER_PEER)]
    return out


class _Pacer:
    """At most one connect every `interval` seconds over every task that asks (the attacker
    holds resources; it does not burn CPU). `run` hands out the turns; a new interval counts
    from the next turn."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._send, self._turns = trio.open_memory_channel[None](0)

    async def run(self) -> None:
        while True:
            await self._send.send(None)
            await trio.sleep(self.interval)

    async def wait(self) -> None:
        await self._turns.receive()


async def _hold_connection(ip: str, port: int, kind: str, pacer: _Pacer, stats: dict) -> None:
    """Connect and misbehave as `kind`, note whether the node closed us at once or held us
    until a handshake deadline, and connect again whenever it does (paced)."""
    while True:
        await pacer.wait()
        try:
            with trio.fail_after(5):
                sock = await trio.open_tcp_stream(ip, port)
        except (OSError, trio.TooSlowError):
            stats["failed"] += 1
            continue
        stats["connects"] += 1
        stats["open"] += 1
        began = trio.current_time()
        try:
            if kind == "garbage":
                await sock.send_all(random.randbytes(64))
            elif kind == "header":
                await sock.send_all(b"\x13/multistream/1.0.0\n")
            elif kind == "half":
                await sock.send_eof()
            while await sock.receive_some(65536):
                pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            stats["open"] -= 1
            await trio.aclose_forcefully(sock)
        # closed at once (after the accept backlog) or held until a handshake deadline (>= 5 s)
        stats["closed_fast" if trio.current_time() - began < 4.0 else "held"] += 1


async def _lane_port(host: p2p.Host, peer: object) -> int:
    stream = await host.libp2p.new_stream(peer, [TProtocol(INFERENCE_PROTOCOL)])
    decoder = p2p.FrameDecoder()
    try:
        with trio.fail_after(READ_DEADLINE):
            await stream.write(p2p.encode_bytes(LaneHello()))
            while True:
                invites = [m for m in decoder.feed(await stream.read(65536)) if isinstance(m, LaneInvite)]
                if invites:
                    return invites[0].port
    finally:
        with trio.CancelScope(shield=True):
            await stream.reset()


async def attack_flood(addr: str, n: int, lane: int, rate: float, hold_rate: float = 100.0,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`n` connections to the libp2p port and `lane` to the lane port, `rate` connects a second;
    ready once each has connected once and the node has closed the excess; then held: each is
    reconnected when closed, `hold_rate` connects a second in all."""
    ip, port = addr.split("/")[2], int(addr.split("/")[4])
    lane_port = 0
    if lane:
        async with _peer(addr) as (host, peer, _):
            lane_port = await _lane_port(host, peer)
    stats = {"connects": 0, "closed_fast": 0, "held": 0, "failed": 0, "open": 0, "began": trio.current_time()}
    pacer = _Pacer(rate)
    kinds = ["idle", "garbage", "header", "half"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        for i in range(n):
            nursery.start_soon(_hold_connection, ip, port, kinds[i % 4], pacer, stats)
        for _ in range(lane):
            nursery.start_soon(_hold_connection, ip, lane_port, "idle", pacer, stats)
        while stats["connects"] + stats["failed"] < n + lane:
            await trio.sleep(0.05)
        pacer.interval = 1.0 / hold_rate
        # ready once the node has worked through the accept queue: what is still open then is
        # what it holds (handshake slots), and new connections come at `hold_rate`
        slots = p2p.constants.MAX_HANDSHAKES_PER_IP + p2p.constants.LANE_MAX_HANDSHAKES
        with trio.move_on_after(10):
            while stats["open"] > slots + 16:
                await trio.sleep(0.05)
        task_status.started(stats)


async def _repeat(attack, pause: float, stats: dict, name: str) -> None:  # type: ignore[no-untyped-def]
    """`attack()` again and again; `stats[name]` counts the attempts begun."""
    while True:
        stats[name] = stats.get(name, 0) + 1
        try:
            await attack()
        except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
            stats[f"{name}_error"] = repr(exc)[:200]
        await trio.sleep(pause)


async def attack_load(addr: str, skip: tuple[str, ...] = (), flood: tuple[int, int] = (300, 100),
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Everything at once (but `skip`), repeated, until cancelled: ready when every attack holds
    its ground."""
    stats: dict = {}
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        host, peer, model = await stack.enter_async_context(_peer(addr))
        for _ in range(SESSIONS_PER_PEER):  # a hog holding its whole share of sessions
            await _open(stack, host, peer, model)
        pests = []
        for _ in range(3):
            pests.append(await stack.enter_async_context(_peer(addr)))

        async def loop_open() -> None:
            h, p, m = pests[0]
            async with AsyncExitStack() as s:
                await _open(s, h, p, m)

        async def huge() -> None:
            async with AsyncExitStack() as s:
                await _open(s, host, peer, model, max_length=1 << 20, batch=64)

        async def oversized() -> None:
            h, p, m = pests[1]
            await _raw(h, p, INFERENCE_PROTOCOL, _open_frame(m), struct.pack("<I", 100 << 20) + bytes(65536))

        async def slow() -> None:
            h, p, m = pests[2]
            await _raw(h, p, INFERENCE_PROTOCOL, _open_frame(m), slow=True)

        for name, attack, pause, copies in (("loop_open", loop_open, 0.15, 1), ("huge", huge, 0.5, 1),
                                            ("oversized", oversized, 1.0, 1), ("slow", slow, 0.1, 4)):
            for _ in range(copies if name not in skip else 0):
                nursery.start_soon(_repeat, attack, pause, stats, name)
        if "flood" not in skip:
            stats["flood"] = await nursery.start(attack_flood, addr, *flood, 400.0, 10.0)
        task_status.started(stats)
        await trio.sleep_forever()  # (until stopped: the peers above live as long as this block)


async def _commands(addr: str) -> None:
    """Read commands (JSON lines) on stdin, answer each with a JSON line on stdout."""
    attacks = {"sessions": attack_sessions, "length": attack_length, "oversized": attack_oversized,
               "slow": attack_slow}
    background = {"flood": attack_flood, "load": attack_load}
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with trio.open_nursery() as nursery:
        running: list[tuple[trio.CancelScope, dict]] = []
        while True:
            while b"\n" not in buffer:
                data = await stdin.receive_some(65536)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            command = json.loads(line)
            name = command.pop("attack")
            if name == "stop":
                for scope, stats in running:
                    scope.cancel()
                    for counts in (stats, stats.get("flood") or {}):
                        if "began" in counts:
                            counts["seconds"] = trio.current_time() - counts.pop("began")
                await trio.sleep(0)
                reply = {"stopped": [stats for _, stats in running]}
                running.clear()
            elif name in background:
                scope = trio.CancelScope()

                async def run(fn=background[name], args=command, scope=scope, task_status=trio.TASK_STATUS_IGNORED):
                    with scope:
                        await fn(addr, **args, task_status=task_status)

                stats = await nursery.start(run)
                running.append((scope, stats))
                reply = {"started": stats}
            else:
                reply = await attacks[name](addr, **command)
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    from p2p._logging import quiet_libp2p_logging

    if os.environ.get("LIBP2P_DEBUG"):  # (py-libp2p's own switch: its logs on stderr)
        import logging

        logging.basicConfig(level=logging.DEBUG)
    quiet_libp2p_logging()
    # A real attacker runs on a machine of its own: here it shares two cores with the node and
    # the honest client, so it yields them (the node's work for it is what the test measures).
    os.nice(10)
    trio.run(_commands, sys.argv[1])
    sys.exit(0)
