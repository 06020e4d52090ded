#!/usr/bin/env python3
"""Two (or more) checkouts of lamina side by side: decode speed of a 2-node swarm of each,
against local decode, one generation of each in turn, round after round.

    python scripts/bench_ab.py NAME=CHECKOUT [NAME=CHECKOUT ...] [--config tiny] [--rounds 30]

e.g. ``before=/tmp/lamina-old now=.``. Every side is a process that keeps its swarm (real
`run-node` processes, started with that checkout first on PYTHONPATH) and its client up for the
whole run, and answers one generation per round; a local generation (this checkout) runs in
each round too. This VM's speed drifts by tens of percent within minutes: interleaving every
side within each round and taking the median of per-round ratios (side / that round's local)
is what makes two versions comparable. Prints JSON: per side, the median decode tok/s and the
median and best ratio to local.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _clock import TokenClock
from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]


def serve(kind: str, path: str, config: str, new_tokens: int) -> None:
    """Answer each "gen" line on stdin with one generation's decode tok/s."""
    import torch

    torch.set_num_threads(1)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))

    def rate(generate) -> float:
        clock = TokenClock()
        generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        return clock.decode_tok_s()

    def loop(generate) -> None:
        rate(generate)  # warm up
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "gen":
                return
            print(json.dumps(rate(generate)), flush=True)

    if kind == "local":
        from pipeline import LocalModelForCausalLM

        return loop(LocalModelForCausalLM.from_pretrained(path).generate)
    from pipeline import DistributedModelForCausalLM
    from pipeline.launch import LocalSwarm

    with LocalSwarm(path, SPLITS[config][2], threads=1) as swarm, \
            DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
        loop(model.generate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sides", nargs="*", help="NAME=CHECKOUT")
    ap.add_argument("--config", default="tiny", choices=sorted(SPLITS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve[0], args.serve[1], args.config, args.new_tokens)
    sides = [s.split("=", 1) for s in args.sides]
    if not sides or any(len(s) != 2 for s in sides):
        ap.error("give at least one NAME=CHECKOUT")
    sys.path.insert(0, str(ROOT))
    from pipeline.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny_model(Path(tmp) / args.config, args.config))
        procs = {}
        for name, checkout in [("local", str(ROOT))] + sides:
            root = str(Path(checkout).resolve())
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--serve", "local" if name == "local" else "swarm", path,
                 "--config", args.config, "--new-tokens", str(args.new_tokens)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=root))
            if procs[name].stdout.readline().strip() != "ready":
                raise SystemExit(f"{name} did not start")
        rates: dict[str, list[float]] = {name: [] for name in procs}
        try:
            for _ in range(args.rounds):
                for name, proc in procs.items():
                    proc.stdin.write("gen\n")
                    proc.stdin.flush()
                    rates[name].append(json.loads(proc.stdout.readline()))
        finally:
            for proc in procs.values():
                proc.stdin.close()
            for proc in procs.values():
                proc.wait(timeout=120)
    local = rates["local"]
    out = {"config": args.config, "rounds": args.rounds, "new_tokens": args.new_tokens,
           "local_decode_tok_s": round(statistics.median(local), 1), "sides": {}}
    for name, _ in sides:
        ratios = [r / l for r, l in zip(rates[name], local)]
        out["sides"][name] = {"decode_tok_s": round(statistics.median(rates[name]), 1),
                              "ratio_median": round(statistics.median(ratios), 3),
                              "ratio_best": round(max(ratios), 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
