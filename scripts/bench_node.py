#!/usr/bin/env python3
"""Aggregate decode throughput of one `run-node` with 1, 4, 16 concurrent sessions.

Starts a real `run-node` process (loopback, --num-threads 1), opens N inference sessions from
this process, prefills each with a short prompt, then runs decode steps (one token per step) in
all sessions at once and times them. Prints JSON: per concurrency, aggregate tokens/s and the
p50/p99 latency of one step as a client sees it (send -> result), plus how the node batched.

    python scripts/bench_node.py                      # the embedded "tiny" model
    python scripts/bench_node.py --sessions 1 4 16 --steps 64 --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import p2p  # noqa: E402
from pipeline import Checkpoint, load_span  # noqa: E402
from pipeline.protocol import (INFERENCE_PROTOCOL, CloseSession, OpenSession, SessionOpened, Step,  # noqa: E402
                                StepResult, new_session_id)

PROMPT = 16


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def start_node(model: Path, blocks: str, threads: int, workdir: Path) -> tuple[trio.Process, str]:
    log = open(workdir / "node.log", "wb")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "node._cli", "--model", str(model), "--blocks", blocks, "--new-swarm",
         "--listen", "/ip4/127.0.0.1/tcp/0", "--num-threads", str(threads), "--max-sessions", "256",
         "--cache-dir", str(workdir / "cache"), "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    buffer = b""
    with trio.fail_after(120):
        while b"\n" not in buffer:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise SystemExit(f"run-node exited: see {workdir / 'node.log'}")
            buffer += chunk
    addr = next(a for a in buffer.decode().split() if a.startswith("/ip4/127.0.0.1/"))
    return proc, addr


async def one_session(host: p2p.Host, peer: str, model_hash: str, hidden_size: int, steps: int,
                      ready: list[int], start: trio.Event, latencies: list[float]) -> None:
    sid = new_session_id()
    gen = torch.Generator().manual_seed(hash(sid) & 0xFFFF)
    async with host.open_session(peer, INFERENCE_PROTOCOL) as stream:
        await stream.send(OpenSession(sid, model_hash, 0, NUM_BLOCKS, PROMPT + steps, 1, "float32"))
        assert type(await stream.receive()) is SessionOpened
        await stream.send(Step(sid, 0, 0, p2p.Tensor.from_torch(torch.randn(1, PROMPT, hidden_size, generator=gen))))
        assert type(await stream.receive()) is StepResult
        token = p2p.Tensor.from_torch(torch.randn(1, 1, hidden_size, generator=gen))
        ready[0] += 1
        await start.wait()
        for i in range(steps):
            began = time.perf_counter()
            await stream.send(Step(sid, i + 1, PROMPT + i, token))
            reply = await stream.receive()
            latencies.append(time.perf_counter() - began)
            assert type(reply) is StepResult, reply
        await stream.send(CloseSession(sid))


async def run_level(host: p2p.Host, peer: str, model_hash: str, hidden_size: int, sessions: int,
                    steps: int) -> dict:
    latencies: list[float] = []
    ready = [0]
    start = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(one_session, host, peer, model_hash, hidden_size, steps, ready, start, latencies)
        with trio.fail_after(120):
            while ready[0] < sessions:  # every session opened and prefilled: time decode only
                await trio.sleep(0.01)
        began = time.perf_counter()
        start.set()
    elapsed = time.perf_counter() - began
    return {
        "sessions": sessions,
        "decode_tokens": sessions * steps,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(sessions * steps / elapsed, 1),
        "step_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "step_p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def local_decode_rate(model: Path, steps: int) -> float:
    """Tokens/s of the same span run locally, one session, no network (the compute floor)."""
    span = load_span(model, 0, NUM_BLOCKS)
    cache = span.new_cache(1, PROMPT + steps)
    d = span.config.hidden_size
    span(torch.randn(1, PROMPT, d), 0, cache)
    token = torch.randn(1, 1, d)
    began = time.perf_counter()
    for i in range(steps):
        span(token, PROMPT + i, cache)
    return steps / (time.perf_counter() - began)


def node_stats(log: Path) -> dict:
    """The batching counters the node logs when it leaves."""
    line = next((l for l in reversed(log.read_text().splitlines()) if "left the swarm" in l), "")
    m = re.search(r"\((\d+) forward passes, (\d+) of them batched, ([\d.]+) segments per pass, (\d+) tokens, "
                  r"([\d.]+) s computing\)", line)
    if not m:
        return {}
    return {"passes": int(m[1]), "batched_passes": int(m[2]), "segments_per_pass": float(m[3]),
            "compute_seconds": float(m[5])}


async def one_level(args: argparse.Namespace, model: Path, workdir: Path, sessions: int) -> dict:
    """A fresh node per level, so its counters describe this level alone."""
    checkpoint = Checkpoint(model)
    proc, addr = await start_node(model, f"0:{NUM_BLOCKS}", args.num_threads, workdir)
    try:
        config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                                enable_dht=False, enable_gossip=False)
        async with p2p.open_host(config) as host:
            peer = (await host.connect(addr)).to_base58()
            await run_level(host, peer, checkpoint.model_hash, checkpoint.config.hidden_size, 1, 4)  # warm up
            level = await run_level(host, peer, checkpoint.model_hash, checkpoint.config.hidden_size, sessions,
                                    args.steps)
    finally:
        proc.terminate()
        with trio.move_on_after(30):
            await proc.wait()
    level["node"] = node_stats(workdir / "node.log")  # includes the warm-up's 2 passes
    return level


async def main_async(args: argparse.Namespace, model: Path, workdir: Path) -> dict:
    levels = [await one_level(args, model, workdir, n) for n in args.sessions]
    base = levels[0]["tokens_per_s"]
    return {
        "model": args.model or f"embedded {args.preset}",
        "blocks": f"0:{NUM_BLOCKS}",
        "device": "cpu",
        "node_num_threads": args.num_threads,
        "steps_per_session": args.steps,
        "local_one_session_tokens_per_s": round(local_decode_rate(model, args.steps), 1),
        "levels": levels,
        "speedup_vs_1_session": {str(lv["sessions"]): round(lv["tokens_per_s"] / base, 2) for lv in levels},
    }


def main() -> None:
    global NUM_BLOCKS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: write the embedded preset)")
    parser.add_argument("--preset", default="tiny", help="embedded preset when --model is not given")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per session")
    parser.add_argument("--num-threads", type=int, default=1, help="the node's torch threads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            from pipeline.tiny import write_tiny_model

            model = write_tiny_model(workdir / args.preset, args.preset)
        NUM_BLOCKS = Checkpoint(model).config.num_hidden_layers
        print(json.dumps(trio.run(main_async, args, model, workdir), indent=2))


NUM_BLOCKS = 0

if __name__ == "__main__":
    main()
