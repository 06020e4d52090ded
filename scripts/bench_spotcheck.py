#!/usr/bin/env python3
"""What spot-checking costs, and how fast it catches a malicious node.

    python scripts/bench_spotcheck.py [--model tiny] [--rates 0,0.05,0.2] [--new-tokens 64]
                                      [--prompt 16] [--repeats 3] [--liar-trials 5]

A swarm of `run-node` processes serves the model's blocks in two spans, each span on two nodes
(so every hop of a route has a second server to check it with). For each sampling rate a client
(`spot_check=rate`, its own statistics) generates greedily; the rates take turns, `--repeats`
rounds, so a drift in the machine's speed hits them alike. Reported per rate: decode tok/s
(best and median), TTFT, the steps and hops checked, and `ratio_vs_rate_0` (median over the
rounds of this rate's decode rate / rate 0's in the same round). Every generation's tokens must
equal the local model's (exit 1 otherwise).

Then, in a second swarm of two honest nodes serving every block, `--liar-trials` times per
nonzero rate: a malicious node (tests/_liar_node.py: 5% noise on its outputs, announcing 3x its
speed) joins serving every block too (the route of one hop through it is the cheapest: the
router picks it; the honest nodes check and judge it), a new
client generates, and the run reports the step at which the liar was caught (the bound is the
sampler's window, round(1/rate) steps, when it lies from the first step), whether the tokens
equal the local model's, and how many generations were started again. The liar then leaves.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _clock import TokenClock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM, load_config, resolve_checkpoint  # noqa: E402
from pipeline.launch import LocalSwarm, spawn_node, wait_ready  # noqa: E402
from pipeline.tiny import write_tiny_model  # noqa: E402

LIAR = [sys.executable, str(ROOT / "tests" / "_liar_node.py")]


def checkpoint(name: str, tmp: Path) -> Path:
    if name in ("tiny", "small"):
        return write_tiny_model(tmp / name, name)
    return Path(resolve_checkpoint(name))


def generate(model, prompt, new_tokens: int) -> tuple[TokenClock, torch.Tensor]:
    clock = TokenClock()
    out = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
    return clock, out


def costs(path: Path, swarm: LocalSwarm, rates: list[float], prompt, expected, args) -> dict:
    clients = {r: DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                              spot_check=r) for r in rates}
    runs: dict[float, list[tuple[float, float]]] = {r: [] for r in rates}
    wrong = 0
    try:
        for model in clients.values():
            generate(model, prompt, 4)    # warm the connections
        for _ in range(args.repeats):
            for r, model in clients.items():
                clock, out = generate(model, prompt, args.new_tokens)
                wrong += not torch.equal(out, expected)
                runs[r].append((clock.decode_tok_s(), clock.ttft()))
        result = {}
        for r, model in clients.items():
            stats = model.spot_check_stats
            ratios = [a[0] / b[0] for a, b in zip(runs[r], runs[rates[0]])]
            result[str(r)] = {
                "decode_tok_s_best": round(max(d for d, _ in runs[r]), 1),
                "decode_tok_s_median": round(statistics.median(d for d, _ in runs[r]), 1),
                "ttft_ms_median": round(1e3 * statistics.median(t for _, t in runs[r]), 1),
                "ratio_vs_rate_0": round(statistics.median(ratios), 3),
                "steps_checked": stats.steps, "hops_checked": stats.hops, "unchecked": stats.unchecked,
                "mismatches": stats.mismatches, "faulty": len(stats.faulty),
            }
        return {"per_rate": result, "wrong_generations": wrong}
    finally:
        for model in clients.values():
            model.close()


def liar_trials(path: Path, swarm: LocalSwarm, span: tuple[int, int], rates: list[float], prompt,
                expected, args) -> dict:
    out: dict = {}
    for r in (r for r in rates if r > 0):
        trials = []
        for i in range(args.liar_trials):
            log = swarm.log_dir / f"liar-{r}-{i}.log"
            liar = wait_ready(spawn_node(path, swarm.node_args(*span), log, prefix=LIAR), log)
            try:
                with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                  spot_check=r) as model:
                    _wait_for(model, liar.peer_id)
                    t0 = time.perf_counter()
                    tokens = model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
                    stats = model.spot_check_stats
                    trials.append({"caught_at_step": stats.caught_at.get(liar.peer_id),
                                   "tokens_equal_local": bool(torch.equal(tokens, expected)),
                                   "redos": stats.redos, "seconds": round(time.perf_counter() - t0, 2)})
            finally:
                liar.signal(signal.SIGTERM)     # it drains and says so: the next client skips it
                liar.proc.wait()
        caught = [t["caught_at_step"] for t in trials if t["caught_at_step"] is not None]
        out[str(r)] = {"window": max(1, round(1 / r)), "trials": trials,
                       "caught": f"{len(caught)}/{len(trials)}", "caught_at_max": max(caught) if caught else None}
    return out


def _wait_for(model, peer: str, timeout: float = 30.0) -> None:
    """Until the client's view of the swarm holds `peer` (the new liar)."""
    from crdt import peer_id_to_str

    inner = model._model
    deadline = time.monotonic() + timeout
    while peer not in {peer_id_to_str(r.peer_id) for r in inner.view.servers(inner.model_hash)}:
        if time.monotonic() > deadline:
            raise SystemExit(f"the client did not see {peer} within {timeout:.0f} s")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, small (written here) or a checkpoint / smollm2")
    ap.add_argument("--rates", default="0,0.05,0.2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--liar-trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if rates[0] != 0:
        rates.insert(0, 0.0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(args.model, Path(tmp))
        blocks = load_config(path).num_hidden_layers
        half = blocks // 2
        prompt = torch.randint(0, 4096, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        prompt %= load_config(path).vocab_size
        local = LocalModelForCausalLM.from_pretrained(path)
        expected = local.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
        spans = [(0, half), (0, half), (half, blocks), (half, blocks)]
        with LocalSwarm(path, spans, threads=args.threads) as swarm:
            report = {"model": args.model, "spans": spans, "new_tokens": args.new_tokens,
                      "prompt": args.prompt, "repeats": args.repeats}
            report.update(costs(path, swarm, rates, prompt, expected, args))
        if args.liar_trials:
            with LocalSwarm(path, [(0, blocks), (0, blocks)], threads=args.threads) as swarm:
                report["liar"] = liar_trials(path, swarm, (0, blocks), rates, prompt, expected, args)
    print(json.dumps(report, indent=2))
    bad = report["wrong_generations"] or any(not t["tokens_equal_local"] for r in report.get("liar", {}).values()
                                             for t in r["trials"])
    if bad:
        print("WRONG TOKENS", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
