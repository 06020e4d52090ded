#!/usr/bin/env python3
"""The OpenAI-compatible gateway vs the client library, on the same swarm: requests/s and p50/p99
time to first token (TTFT) for 1, 4 and 16 concurrent streamed chat requests.

    python scripts/bench_gateway.py [--concurrency 1,4,16] [--max-tokens 16] [--requests 3]
    python scripts/bench_gateway.py --initial-peers /ip4/.../p2p/...   # an existing swarm

Without --initial-peers it starts a local swarm of the embedded SmolLM2 (`--nodes`, default 3,
one torch thread each). Then, at each concurrency level C, C workers each send `--requests`
requests back to back, first through the client library in this process
(`AsyncDistributedModelForCausalLM.generate` with a streamer), then through a `run-gateway`
process (httpx, ``"stream": true``). Every request is the same greedy chat (chat template,
`--max-tokens` new tokens, stop at end of turn). TTFT is from just before the request (the
template rendering and tokenizing included on both paths) to its first token (direct: the
streamer's first new token; gateway: the first SSE chunk with text). Requests/s is the requests
of the level over its wall time. One warm-up request per path is not counted. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from _gateway import running_gateway  # noqa: E402
from pipeline import AsyncDistributedModelForCausalLM  # noqa: E402
from pipeline._chat import stop_token_ids  # noqa: E402
from pipeline._chat_cli import spans  # noqa: E402
from pipeline._embedded import embedded_model_path  # noqa: E402
from pipeline.launch import LocalSwarm  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class _FirstToken:
    def __init__(self) -> None:
        self.seen_prompt, self.at = False, None

    def put(self, value) -> None:
        if self.seen_prompt and self.at is None:
            self.at = time.perf_counter()
        self.seen_prompt = True

    def end(self) -> None:
        pass


async def direct_request(model, max_tokens: int) -> float:
    t0 = time.perf_counter()
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    first = _FirstToken()
    await model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, streamer=first,
                         eos_token_id=list(stop_token_ids(tok, model.config.eos_token_ids)))
    return first.at - t0


async def gateway_request(http: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
    return first - t0


async def level(request, concurrency: int, per_worker: int) -> dict:
    ttfts: list[float] = []

    async def worker() -> None:
        for _ in range(per_worker):
            ttfts.append(await request())

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(ttfts), "requests_per_s": round(len(ttfts) / wall, 2),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1)}


async def bench(peers: list[str], gateway_url: str, args) -> list[dict]:
    results = []
    async with AsyncDistributedModelForCausalLM.from_pretrained(embedded_model_path(), initial_peers=peers) as model, \
            httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
        await direct_request(model, args.max_tokens)                 # warm-up
        await gateway_request(http, gateway_url, args.max_tokens)
        for c in args.concurrency:
            direct = await level(lambda: direct_request(model, args.max_tokens), c, args.requests)
            via = await level(lambda: gateway_request(http, gateway_url, args.max_tokens), c, args.requests)
            results.append({"concurrency": c, "direct": direct, "gateway": via,
                            "gateway_added_ttft_p50_ms": round(via["ttft_p50_ms"] - direct["ttft_p50_ms"], 1)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="requests per worker at each level")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--initial-peers", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    swarm = None
    try:
        peers = args.initial_peers
        if not peers:
            swarm = LocalSwarm(embedded_model_path(), spans(30, args.nodes), log_dir=logs).start()
            peers = swarm.initial_peers
        with running_gateway(peers, logs, "--max-sessions", str(max(args.concurrency))) as gateway:
            results = trio.run(bench, peers, gateway.url, args)
    finally:
        if swarm is not None:
            swarm.stop()
    print(json.dumps({"bench": "gateway", "machine": platform.machine(), "cpus": os.cpu_count(),
                      "torch_threads": 1, "model": "smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF)",
                      "nodes": args.nodes if not args.initial_peers else None, "max_tokens": args.max_tokens,
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
