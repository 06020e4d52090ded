#!/usr/bin/env python3
"""Decoding over emulated WAN links, against the physical bound.

    sudo python scripts/bench_wan.py [--nodes 2,3,4] [--delays 5,25,50] [--new-tokens 16] [--repeats 3]

For each node count n and one-way delay d: a NatLab internet (tests/netlab.py) with n public
hosts, each running `run-node` with an equal share of the tiny model's blocks, and a client
host (scripts/_wanlab.py, shared with `bench_swarm.py --clients --links`); every host's outbound traffic goes through the lab's userspace link emulator with delay d
(`netlab.shape`), so any two hosts see a one-way latency of d. The client (this script again,
`--worker`, inside the client's namespace) runs `--repeats` generations of `--new-tokens`
tokens in each mode, after a warm-up generation:

- `push`: the push chain (each node sends its output straight to the next, the last to the
  client): a decode step costs (n+1) link latencies plus the compute;
- `client_relayed`: the client carries every hop's output to the next node (lamina's fallback
  for nodes that cannot reach each other, forced with `client_relays=True`): 2n latencies.

Reported per (n, d): the median decode step (the time between consecutive tokens), the time to
first token (the generation's start to its first token: session opening on every node included),
and `ratio` = step / ((n+1)·d + local step), where the local step is the same model's decode
step run in one process (measured here, first). For the relayed mode `ratio_vs_push` = its step
over the push step; the physical expectation is about 2n/(n+1). The tokens of every generation
are checked against the local model's.

Prints one JSON object (progress on stderr). Needs root, `ip`, `nft` (the lab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _clock import TokenClock  # noqa: E402
from _wanlab import spans, wan_swarm  # noqa: E402  (the lab: nodes on shaped hosts)

PROMPT = [1, 5, 9, 14, 3, 7, 11, 2]
MODES = ("push", "client_relayed")


def _log(text: str) -> None:
    print(f"[bench_wan {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def local_step_ms(model_dir: Path, new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    import torch

    from pipeline import LocalModelForCausalLM

    model = LocalModelForCausalLM.from_pretrained(model_dir)
    steps, out = [], None
    for _ in range(repeats + 1):
        clock = TokenClock()
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        steps += [b - a for a, b in zip(clock.times, clock.times[1:])]
    return statistics.median(steps) * 1e3, out[0, len(PROMPT):].tolist()


def worker(args) -> int:
    """Inside the client's namespace: one JSON line per mode."""
    import torch

    torch.set_num_threads(1)
    from pipeline import DistributedModelForCausalLM

    expected = json.loads(args.expected)
    for mode in MODES:
        with DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer],
                                                         client_relays=(mode == "client_relayed")) as model:
            steps, ttfts, equal = [], [], True
            for r in range(args.repeats + 1):                       # the first one warms up
                clock = TokenClock()
                out = model.generate(torch.tensor([PROMPT]), max_new_tokens=args.new_tokens, eos_token_id=[],
                                     streamer=clock)
                equal &= out[0, len(PROMPT):].tolist() == expected
                if r:
                    ttfts.append(clock.ttft())
                    steps += [b - a for a, b in zip(clock.times, clock.times[1:])]
        print(json.dumps({"mode": mode, "step_ms": statistics.median(steps) * 1e3,
                          "step_p90_ms": sorted(steps)[int(0.9 * (len(steps) - 1))] * 1e3,
                          "ttft_ms": statistics.median(ttfts) * 1e3, "tokens_equal_local": equal}), flush=True)
    return 0


def run_config(model_dir: Path, n: int, delay_ms: float, expected: list[int], local_ms: float,
               args, logs: Path) -> dict:
    from netlab import read_line, stop
    from pipeline import load_config

    tag = f"n{n}-d{delay_ms:g}"
    with wan_swarm(model_dir, spans(load_config(model_dir).num_hidden_layers, n), delay_ms, logs, tag) as swarm:
        client = swarm.add_client("client")
        with open(logs / f"{tag}-client.log", "wb") as client_log:
            work = client.popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--model",
                                 str(model_dir), "--peer", swarm.first, "--expected", json.dumps(expected),
                                 "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                                stdin=subprocess.DEVNULL, stderr=client_log)
        try:
            results = {}
            for _ in MODES:
                rec = json.loads(read_line(work, timeout=600))
                results[rec.pop("mode")] = rec
        finally:
            stop(work)
    bound = (n + 1) * delay_ms + local_ms
    push, relayed = results["push"], results["client_relayed"]
    return {
        "nodes": n, "one_way_ms": delay_ms, "bound_ms": round(bound, 2),
        "push": {**_rounded(push), "ratio": round(push["step_ms"] / bound, 3)},
        "client_relayed": {**_rounded(relayed), "ratio_vs_push": round(relayed["step_ms"] / push["step_ms"], 3),
                           "expected_vs_push": round((2 * n * delay_ms + local_ms) / bound, 3)},
    }


def _rounded(rec: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,3,4")
    ap.add_argument("--delays", default="5,25,50", help="one-way link delays, ms")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--expected", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch

    torch.set_num_threads(1)
    from pipeline.tiny import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench_wan-") as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny", "tiny")
        logs = Path(args.log_dir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        local_ms, expected = local_step_ms(model_dir, args.new_tokens, args.repeats)
        _log(f"local decode step {local_ms:.2f} ms")
        out = {"model": "tiny", "new_tokens": args.new_tokens, "repeats": args.repeats,
               "local_step_ms": round(local_ms, 2), "runs": []}
        for n in [int(x) for x in args.nodes.split(",")]:
            for d in [float(x) for x in args.delays.split(",")]:
                _log(f"{n} nodes, one-way {d:g} ms ...")
                out["runs"].append(run_config(Path(model_dir), n, d, expected, local_ms, args, logs))
                _log(json.dumps(out["runs"][-1]))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
