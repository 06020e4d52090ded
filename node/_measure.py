"""What a node measures to announce: its span's decode throughput (cached on disk) and RTTs to
the nodes of the next blocks.

Throughput is measured once per (device, model hash, dtype, span) by a short decode benchmark of
the node's own span and kept in ``<cache dir>/throughput.json``, so a restart announces at once.
RTTs are InfoRequest round trips on ``/lamina/info/1`` to up to `RTT_PEERS` ONLINE nodes holding
the block after ours.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import trio

import crdt
import p2p
from pipeline import Span
from pipeline.protocol import INFO_PROTOCOL, InfoRequest

from ._announce import learn_addrs

logger = logging.getLogger("lamina.node")

THROUGHPUT_FILE = "throughput.json"
BENCH_WARMUP_STEPS = 2
BENCH_MAX_STEPS = 32
BENCH_MAX_SECONDS = 1.0  # the benchmark stops after this long (at least 2 timed steps)
BENCH_PREFIX = 16  # cached positions the timed decode steps attend to
RTT_INTERVAL = 30.0  # seconds between RTT rounds to the next blocks' nodes
RTT_PEERS = 8  # nodes pinged per round (crdt's MAX_RTTS)
PING_DEADLINE = 5.0
MAX_RTT_MS = 3_600_000.0  # crdt's bound on an announced RTT


# -- throughput ----------------------------------------------------------------------------------
def throughput_key(device: torch.device | str, model_hash: str, dtype: torch.dtype, start: int, end: int) -> str:
    return f"{torch.device(device)}|{model_hash}|{str(dtype).removeprefix('torch.')}|{start}:{end}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_throughput(cache_dir: Path, key: str) -> float | None:
    entry = _read_cache(cache_dir / THROUGHPUT_FILE).get(key)
    value = entry.get("tokens_per_s") if isinstance(entry, dict) else None
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    return None


def store_throughput(cache_dir: Path, key: str, tokens_per_s: float) -> None:
    """Add one measurement to the cache file (atomically replaced; errors only logged)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / THROUGHPUT_FILE
        data = _read_cache(path)
        data[key] = {"tokens_per_s": tokens_per_s, "measured_at": int(time.time())}
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".throughput.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write the throughput cache in %s: %s", cache_dir, exc)


def measure_throughput(span: Span) -> float:
    """Decode tokens/s of one session (batch 1) through the whole span. Blocking: run it in a
    worker thread."""
    cache = span.new_cache(1, BENCH_PREFIX + BENCH_WARMUP_STEPS + BENCH_MAX_STEPS)
    gen = torch.Generator().manual_seed(0)
    d = span.config.hidden_size
    prefix = torch.randn(1, BENCH_PREFIX, d, generator=gen).to(span.device, span.dtype)
    span(prefix, 0, cache)
    token = torch.randn(1, 1, d, generator=gen).to(span.device, span.dtype)
    pos = BENCH_PREFIX
    for _ in range(BENCH_WARMUP_STEPS):
        span(token, pos, cache)
        pos += 1
    steps, began = 0, time.perf_counter()
    while steps < BENCH_MAX_STEPS and (steps < 2 or time.perf_counter() - began < BENCH_MAX_SECONDS):
        span(token, pos, cache)
        pos += 1
        steps += 1
    if span.device.type == "cuda":
        torch.cuda.synchronize(span.device)
    return steps / max(time.perf_counter() - began, 1e-9)


async def span_throughput(span: Span, model_hash: str, cache_dir: Path) -> float:
    """The span's decode throughput, from the cache or measured now (and cached)."""
    key = throughput_key(span.device, model_hash, span.dtype, span.start, span.end)
    cached = cached_throughput(cache_dir, key)
    if cached is not None:
        logger.info("throughput %.1f tokens/s (cached in %s)", cached, cache_dir / THROUGHPUT_FILE)
        return cached
    value = await trio.to_thread.run_sync(measure_throughput, span)
    logger.info("throughput %.1f tokens/s (measured)", value)
    store_throughput(cache_dir, key, value)
    return value


# -- RTTs ----------------------------------------------------------------------------------------
def next_block_servers(records: list[crdt.ServerRecord], me: bytes, end: int) -> list[crdt.ServerRecord]:
    """Online servers whose span holds block `end` (the block after ours), at most
    `RTT_PEERS`, in peer id order."""
    found = [r for r in records
             if r.peer_id != me and r.start <= end < r.end and r.state is crdt.ServerState.ONLINE]
    return sorted(found, key=lambda r: r.peer_id)[:RTT_PEERS]


async def ping(host: p2p.Host, peer: str) -> float:
    """Round trip of an InfoRequest to `peer`, in ms (the stream open is not counted when the
    connection exists; a first ping may include the dial)."""
    began = trio.current_time()
    with trio.fail_after(PING_DEADLINE):
        await host.request(peer, INFO_PROTOCOL, InfoRequest())
    return (trio.current_time() - began) * 1000.0


async def measure_rtts(host: p2p.Host, records: list[crdt.ServerRecord]) -> dict[bytes, float]:
    """RTTs in ms to each of `records`' peers (those that answer in time)."""
    rtts: dict[bytes, float] = {}

    async def one(record: crdt.ServerRecord) -> None:
        peer = crdt.peer_id_to_str(record.peer_id)
        learn_addrs(host, peer, list(record.addrs))
        try:
            rtts[record.peer_id] = min(await ping(host, peer), MAX_RTT_MS)
        except (p2p.P2PError, trio.TooSlowError) as exc:
            logger.debug("ping %s failed: %r", peer, exc)

    async with trio.open_nursery() as nursery:
        for record in records:
            nursery.start_soon(one, record)
    return rtts
