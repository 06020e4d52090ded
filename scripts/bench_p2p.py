#!/usr/bin/env python3
"""Benchmark lamina's p2p layer against a bare py-libp2p stream and raw trio TCP.

One run prints one JSON object. Every figure crosses two processes on loopback: this one (the
client) and one server subprocess that serves all three transports (it prints their addresses
on one line, which the client waits for). Samples of the transports are interleaved, so a busy
machine slows them alike and the ratios stay meaningful.

* rtt_16k_us: median round trip of a 16 KiB payload echoed by the server (raw: bytes on a TCP
  socket; libp2p: bytes on an open yamux stream over Noise; lamina: a `Message` carrying a
  16 KiB float32 `Tensor` on an open `Session`, decoded and re-encoded by the server);
* lamina_lane: the same `Session` moved to a direct lane (p2p/_lane.py: its own TCP connection,
  ChaCha20-Poly1305 records), as inference and push sessions are;
* throughput_mb_s: 64 MiB sent one way, acknowledged by the server once it has all of it
  (libp2p: written in 1 MiB pieces; libp2p_64k_writes: written in 65507-byte pieces, the trick
  lamina uses; lamina: one message with a 64 MiB tensor, decoded on the server). MB = 10^6 B.

Usage: python scripts/bench_p2p.py [--rounds 5] [--rtt-samples 500] [--mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch  # imported up front: a first import inside the event loop stalls it for seconds
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import p2p  # noqa: E402

RTT_SIZE = 16 * 1024
CHUNK = 1 << 20
SINK = "/lamina-bench/sink/1"
ECHO = "/lamina-bench/echo/1"


# --- lamina messages ---------------------------------------------------------------------------
@p2p.message("bench.blob")
@dataclass(frozen=True)
class Blob(p2p.Message):
    seq: int
    data: p2p.Tensor


@p2p.message("bench.ack")
@dataclass(frozen=True)
class Ack(p2p.Message):
    seq: int
    nbytes: int


# --- servers -------------------------------------------------------------------------------------
async def _read_exactly_raw(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = await stream.receive_some(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


async def _raw_handler(stream: trio.SocketStream) -> None:
    """9-byte request header: kind (0 echo, 1 sink) and a u64 length."""
    try:
        while True:
            head = await _read_exactly_raw(stream, 9)
            kind, n = head[0], int.from_bytes(head[1:], "little")
            if kind == 0:
                await stream.send_all(await _read_exactly_raw(stream, n))
            else:
                left = n
                while left:
                    got = await stream.receive_some(min(left, 4 * CHUNK))
                    if not got:
                        return
                    left -= len(got)
                await stream.send_all(b"ok")
    except (trio.BrokenResourceError, EOFError):
        return


def _bare_host():  # type: ignore[no-untyped-def]
    """A py-libp2p host with lamina's stack (Noise, yamux, one connection per peer)."""
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE, Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX, Yamux

    kp = create_new_key_pair()
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(
        key_pair=kp,
        listen_addrs=la,
        sec_opt={TProtocol(NOISE): Noise(kp, noise_privkey=x25519().private_key)},
        muxer_opt={TProtocol(YAMUX): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    return host, la


async def _read_exactly_stream(stream, n: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray()
    while len(buf) < n:
        got = await stream.read(min(n - len(buf), 4 * CHUNK))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


async def _bare_echo(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while True:
            n = int.from_bytes(await _read_exactly_stream(stream, 8), "little")
            await stream.write(await _read_exactly_stream(stream, n))
    except Exception:
        return


async def _bare_sink(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while True:
            left = int.from_bytes(await _read_exactly_stream(stream, 8), "little")
            while left:
                left -= len(await stream.read(min(left, 4 * CHUNK)))
            await stream.write(b"ok")
    except Exception:
        return


async def _lamina_echo(peer, session: p2p.Session) -> None:  # type: ignore[no-untyped-def]
    async for msg in session:
        await session.send(msg)


async def _lamina_sink(peer, session: p2p.Session) -> None:  # type: ignore[no-untyped-def]
    async for msg in session:
        t = msg.data.to_torch()  # zero-copy view of the received bytes
        await session.send(Ack(msg.seq, t.numel() * t.element_size()))


async def serve_all() -> None:
    from libp2p.custom_types import TProtocol

    p2p.quiet_libp2p_logging()
    bare, la = _bare_host()
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], enable_dht=False, enable_gossip=False)
    async with trio.open_nursery() as nursery, bare.run(la), p2p.open_host(config) as lamina:
        listeners = await nursery.start(partial(trio.serve_tcp, _raw_handler, 0, host="127.0.0.1"))
        bare.set_stream_handler(TProtocol(ECHO), _bare_echo)
        bare.set_stream_handler(TProtocol(SINK), _bare_sink)
        lamina.set_session_handler(ECHO, _lamina_echo, lane=True)
        lamina.set_session_handler(SINK, _lamina_sink, lane=True)
        port = listeners[0].socket.getsockname()[1]
        print(json.dumps({"raw": f"127.0.0.1:{port}", "libp2p": str(bare.get_addrs()[0]), "lamina": lamina.addrs()[0]}), flush=True)
        await trio.sleep_forever()


# --- client --------------------------------------------------------------------------------------
def _mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


async def run_client(addrs: dict[str, str], rounds: int, rtt_samples: int, size: int) -> dict:
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    host, port = addrs["raw"].split(":")
    raw = await trio.open_tcp_stream(host, int(port))
    bare, la = _bare_host()
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], enable_dht=False, enable_gossip=False)
    async with bare.run(la), p2p.open_host(config) as lamina:
        ma = multiaddr.Multiaddr(addrs["libp2p"])
        bare_peer = ID.from_base58(ma.value_for_protocol("p2p"))
        await bare.connect(PeerInfo(bare_peer, [ma]))
        bare_echo = await bare.new_stream(bare_peer, [TProtocol(ECHO)])
        bare_sink = await bare.new_stream(bare_peer, [TProtocol(SINK)])
        lamina_peer = await lamina.connect(addrs["lamina"])
        async with lamina.open_session(lamina_peer, ECHO) as echo, lamina.open_session(lamina_peer, SINK) as sink, \
                lamina.open_session(lamina_peer, ECHO, lane=True) as lane_echo, \
                lamina.open_session(lamina_peer, SINK, lane=True) as lane_sink:
            assert (echo.transport, lane_echo.transport, lane_sink.transport) == ("libp2p", "lane", "lane")
            payload = os.urandom(RTT_SIZE)
            small = p2p.Tensor.from_torch(torch.randn(RTT_SIZE // 4))

            async def rtt_raw(i: int) -> None:
                await raw.send_all(b"\x00" + RTT_SIZE.to_bytes(8, "little") + payload)
                await _read_exactly_raw(raw, RTT_SIZE)

            async def rtt_bare(i: int) -> None:
                await bare_echo.write(RTT_SIZE.to_bytes(8, "little") + payload)
                await _read_exactly_stream(bare_echo, RTT_SIZE)

            async def rtt_lamina(i: int) -> None:
                await echo.send(Blob(i, small))
                reply = await echo.receive()
                assert reply.seq == i
                if i == 0:
                    assert reply.data == small  # checked once, outside the timed samples

            async def rtt_lane(i: int) -> None:
                await lane_echo.send(Blob(i, small))
                reply = await lane_echo.receive()
                assert reply.seq == i

            big = bytes(size)
            big_view = memoryview(big)
            big_tensor = p2p.Tensor.from_torch(torch.zeros(size // 4))

            async def bulk_raw(i: int) -> None:
                await raw.send_all(b"\x01" + size.to_bytes(8, "little"))
                for off in range(0, size, CHUNK):
                    await raw.send_all(big_view[off : off + CHUNK])
                assert await _read_exactly_raw(raw, 2) == b"ok"

            async def bulk_bare(i: int, piece: int = CHUNK) -> None:
                await bare_sink.write(size.to_bytes(8, "little"))
                for off in range(0, size, piece):
                    await bare_sink.write(big_view[off : off + piece])
                assert await _read_exactly_stream(bare_sink, 2) == b"ok"

            async def bulk_bare_64k(i: int) -> None:
                await bulk_bare(i, 65535 - 16 - 12)

            async def bulk_lamina(i: int) -> None:
                await sink.send(Blob(i, big_tensor))
                ack = await sink.receive()
                assert ack.nbytes == size

            async def bulk_lane(i: int) -> None:
                await lane_sink.send(Blob(i, big_tensor))
                ack = await lane_sink.receive()
                assert ack.nbytes == size

            rtts = await _interleaved({"raw_tcp": rtt_raw, "libp2p": rtt_bare, "lamina": rtt_lamina, "lamina_lane": rtt_lane}, rtt_samples, warmup=50)
            bulk = await _interleaved(
                {"raw_tcp": bulk_raw, "libp2p": bulk_bare, "libp2p_64k_writes": bulk_bare_64k, "lamina": bulk_lamina,
                 "lamina_lane": bulk_lane}, rounds, warmup=1
            )
        await bare.close()
    await raw.aclose()
    out: dict[str, dict] = {}
    for kind in bulk:
        out[kind] = {"throughput_mb_s": round(_mb_s(size, statistics.median(bulk[kind])), 1)}
        if kind in rtts:
            out[kind]["rtt_16k_us"] = round(statistics.median(rtts[kind]) * 1e6, 1)
    return out


async def _interleaved(fns: dict, samples: int, warmup: int) -> dict[str, list[float]]:
    """Time every function `samples` times, round-robin, rotating the order each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(warmup + samples):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t = time.perf_counter()
            await fns[name](i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=7, help="bulk transfers per transport")
    parser.add_argument("--rtt-samples", type=int, default=500, help="round trips per transport")
    parser.add_argument("--mb", type=int, default=64, help="MiB per bulk transfer")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_all)
        return
    size = args.mb * 1024 * 1024
    load_before = os.getloadavg()[0]  # other work on the machine; the benchmark adds ~2
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("benchmark server did not start")
        results = trio.run(run_client, json.loads(line), args.rounds, args.rtt_samples, size)
    finally:
        server.kill()
        server.wait()
    lam, bare, raw = results["lamina"], results["libp2p"], results["raw_tcp"]
    out = {
        "command": " ".join(["python scripts/bench_p2p.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_avg_1m_before": round(load_before, 2)},
        "payload": {"rtt_bytes": RTT_SIZE, "bulk_bytes": size, "bulk_rounds": args.rounds, "rtt_samples": args.rtt_samples},
        **results,
        "ratios": {
            "lamina_over_libp2p_rtt": round(lam["rtt_16k_us"] / bare["rtt_16k_us"], 3),
            "lamina_over_libp2p_throughput": round(lam["throughput_mb_s"] / bare["throughput_mb_s"], 3),
            "libp2p_over_raw_rtt": round(bare["rtt_16k_us"] / raw["rtt_16k_us"], 2),
            "libp2p_over_raw_throughput": round(bare["throughput_mb_s"] / raw["throughput_mb_s"], 3),
            "lane_over_libp2p_rtt": round(results["lamina_lane"]["rtt_16k_us"] / bare["rtt_16k_us"], 3),
            "lane_over_raw_rtt": round(results["lamina_lane"]["rtt_16k_us"] / raw["rtt_16k_us"], 2),
            "lane_over_libp2p_throughput": round(results["lamina_lane"]["throughput_mb_s"] / bare["throughput_mb_s"], 2),
        },
        "goals": {
            "framing_adds_at_most_20pct_rtt": lam["rtt_16k_us"] <= 1.2 * bare["rtt_16k_us"],
            "tensor_throughput_at_least_150_mb_s": lam["throughput_mb_s"] >= 150,
            "lane_tensor_throughput_at_least_150_mb_s": results["lamina_lane"]["throughput_mb_s"] >= 150,
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
