"""Garbage against every handler of a real host: random, truncated, oversized and wrongly typed
frames. The host stays up, the sender gets a clear error frame, other sessions carry on."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import msgpack
import pytest
import trio
from libp2p.custom_types import TProtocol

import p2p

UNARY = "/test/fuzz-unary/1"
SESSION = "/test/fuzz-session/1"
OURS = (UNARY, SESSION)


@p2p.message("test.fuzz.ping")
@dataclass(frozen=True)
class Ping(p2p.Message):
    n: int = p2p.field(min_value=0)
    note: str = p2p.field(default="", max_len=32)


@p2p.message("test.fuzz.other")
@dataclass(frozen=True)
class Other(p2p.Message):
    blob: p2p.Tensor


def _config(**kwargs) -> p2p.HostConfig:  # type: ignore[no-untyped-def]
    return p2p.HostConfig(
        identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], gossip_topics=["fuzz"], max_message_size=1 << 20, **kwargs
    )


@pytest.fixture
async def hosts(nursery):  # type: ignore[no-untyped-def]
    """A server with both kinds of handler plus DHT and gossip, a fuzzing client, a bystander
    client with a long-lived session open."""
    server = await nursery.start(p2p.serve_host, _config())
    server.seen = []  # type: ignore[attr-defined]  # messages the session handler received

    async def unary(peer: object, request: p2p.Message) -> p2p.Message:
        return Ping(request.n + 1)

    async def session_handler(peer: object, session: p2p.Session) -> None:
        async for msg in session:
            server.seen.append(msg)
            await session.send(Ping(msg.n + 1))

    server.set_unary_handler(UNARY, unary, accepts=Ping)
    server.set_session_handler(SESSION, session_handler)
    fuzzer = await nursery.start(p2p.serve_host, _config())
    bystander = await nursery.start(p2p.serve_host, _config())
    await fuzzer.connect(server.addrs()[0])
    await bystander.connect(server.addrs()[0])
    return server, fuzzer, bystander


def _frame(header: object, tail: bytes = b"") -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<I", len(h)) + h + tail
    return struct.pack("<I", len(body)) + body


def _garbage_cases() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, half-close after writing). Frames are invalid in every way we know."""
    rng = random.Random(1234)
    cases = {f"random-{i}": (rng.randbytes(rng.randint(1, 300)), True) for i in range(6)}
    valid = p2p.encode_bytes(Ping(1))
    cases.update(
        {
            "oversized-prefix": (struct.pack("<I", 2**31), False),
            "just-over-the-limit": (struct.pack("<I", (1 << 20) + 1), False),
            "truncated-then-eof": (valid[: len(valid) // 2], True),
            "prefix-only-then-eof": (valid[:3], True),
            "not-msgpack": (struct.pack("<II", 5, 1) + b"\xc1", False),
            "unknown-type": (_frame([1, "no.such.message", {}, []]), False),
            "wrong-field-type": (_frame([1, "test.fuzz.ping", {"n": "seven", "note": ""}, []]), False),
            "field-out-of-range": (_frame([1, "test.fuzz.ping", {"n": -1, "note": ""}, []]), False),
            "string-too-long": (_frame([1, "test.fuzz.ping", {"n": 1, "note": "x" * 33}, []]), False),
            "missing-tensor-bytes": (_frame([1, "test.fuzz.other", {}, [["blob", "float32", [1000]]]]), False),
            "bad-version": (_frame([9, "test.fuzz.ping", {"n": 1}, []]), False),
            "valid-then-garbage": (valid + b"\xff" * 16, False),
            "heartbeat-after-goodbye": (p2p.encode_bytes(p2p.Goodbye()) + p2p.encode_bytes(p2p.Heartbeat()), False),
        }
    )
    return cases


GARBAGE = _garbage_cases()


async def _throw(client: p2p.Host, server: p2p.Host, protocol: str, data: bytes, half_close: bool, wait: float = 10) -> list[p2p.Message]:
    """Write raw bytes on a fresh stream, return every frame the server answered with (until
    it closes the stream, or for at most `wait` seconds)."""
    stream = await client.libp2p.new_stream(server.peer_id, [TProtocol(protocol)])
    received: list[p2p.Message] = []
    decoder = p2p.FrameDecoder()
    try:
        with trio.move_on_after(wait) if wait < 10 else trio.fail_after(wait):
            await stream.write(data)
            if half_close:
                await stream.close()
            while True:
                try:
                    chunk = await stream.read(65536)
                except Exception:  # EOF or reset: the server is done with us
                    break
                if not chunk:
                    break
                received += decoder.feed(chunk)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await stream.reset()
            except Exception:
                pass
    return received


async def _still_serving(server: p2p.Host, bystander: p2p.Host, session: p2p.Session, n: int) -> None:
    await session.send(Ping(n))
    assert await session.receive() == Ping(n + 1)
    assert await bystander.request(server.peer_id, UNARY, Ping(n)) == Ping(n + 1)


async def test_garbage_against_our_handlers_gets_a_clear_error(hosts) -> None:  # type: ignore[no-untyped-def]
    server, fuzzer, bystander = hosts
    async with bystander.open_session(server.peer_id, SESSION) as session:
        await _still_serving(server, bystander, session, 0)
        for protocol in OURS:
            for name, (data, half_close) in GARBAGE.items():
                answer = await _throw(fuzzer, server, protocol, data, half_close)
                errors = [m for m in answer if isinstance(m, p2p.ErrorMessage)]
                if name == "valid-then-garbage" and protocol == SESSION:
                    assert server.seen[-1] == Ping(1)  # the valid frame before the garbage was served
                    assert answer[0] in (Ping(2), errors[0])  # (the reply races the error frame)
                assert errors, f"{protocol} {name}: no error frame in {answer!r}"
                assert errors[-1].code == p2p.ErrorCode.PROTOCOL_ERROR, (protocol, name, errors)
                assert answer[-1] == p2p.Goodbye()
                await _still_serving(server, bystander, session, 1)


async def test_wrongly_typed_but_valid_messages(hosts) -> None:  # type: ignore[no-untyped-def]
    server, fuzzer, bystander = hosts
    other = Other(p2p.Tensor("float32", (2,), b"\x00" * 8))
    with pytest.raises(p2p.RemoteError) as info:
        await fuzzer.request(server.peer_id, UNARY, other)
    assert info.value.code == p2p.ErrorCode.BAD_REQUEST
    async with fuzzer.open_session(server.peer_id, SESSION) as session:  # the handler reads .n
        await session.send(other)
        with pytest.raises(p2p.RemoteError) as info:
            await session.receive()
        assert info.value.code == p2p.ErrorCode.INTERNAL and "AttributeError" in info.value.message
    assert await bystander.request(server.peer_id, UNARY, Ping(5)) == Ping(6)


async def test_garbage_against_py_libp2p_handlers_leaves_the_host_up(hosts) -> None:  # type: ignore[no-untyped-def]
    server, fuzzer, bystander = hosts
    protocols = [str(p) for p in server.libp2p.get_mux().handlers if p is not None and str(p) not in OURS]
    print("py-libp2p protocols fuzzed:", protocols)
    assert any("kad" in p for p in protocols) and any("meshsub" in p for p in protocols)
    async with bystander.open_session(server.peer_id, SESSION) as session:
        for protocol in protocols:
            for name in ("random-0", "random-1", "oversized-prefix", "truncated-then-eof", "valid-then-garbage"):
                data, half_close = GARBAGE[name]
                try:  # py-libp2p's handlers do not answer garbage: do not wait for them
                    await _throw(fuzzer, server, protocol, data, half_close, wait=0.1)
                except Exception:
                    pass  # py-libp2p may refuse or reset; we only care that the host survives
            await _still_serving(server, bystander, session, 3)
    assert server.peer_id in bystander.connected_peers()


async def test_a_flood_of_garbage_streams_does_not_starve_others(hosts) -> None:  # type: ignore[no-untyped-def]
    server, fuzzer, bystander = hosts
    async with bystander.open_session(server.peer_id, SESSION) as session:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                data, half_close = GARBAGE[f"random-{i % 6}"]
                nursery.start_soon(_throw, fuzzer, server, OURS[i % 2], data, half_close)
            for n in range(10):
                await _still_serving(server, bystander, session, n)
