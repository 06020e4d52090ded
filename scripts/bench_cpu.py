#!/usr/bin/env python3
"""Where the CPU goes in a decode: CPU time per token of every process of a local generation
and of a 2-node loopback swarm (the client and each `run-node`), from the kernel's scheduler
statistics.

    python scripts/bench_cpu.py [--config tiny] [--rounds 5] [--new-tokens 256]

One local and one swarm generation per round, alternately (a shared VM's speed drifts). For
each process, summed over its threads (`/proc/<pid>/task/*/schedstat`): ``cpu_ms`` (time on a
CPU), ``runqueue_ms`` (time ready to run but waiting for a CPU: the cores were busy) and
``timeslices`` (times it was put on a CPU), all per new token, medians over the rounds. Every
process runs torch with one intra-op thread, as in `bench_swarm.py`. Compare the swarm's
``wall_ms`` with ``cpu_ms`` summed over its processes: a split decode runs one process at a
time, so what the nodes and the client spend besides the model's own work is on the token's
path unless it overlaps another process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM  # noqa: E402
from pipeline.launch import LocalSwarm  # noqa: E402
from pipeline.tiny import write_tiny_model  # noqa: E402


def schedstat(pid: int) -> tuple[float, float, int]:
    """(seconds on a CPU, seconds waiting in a run queue, timeslices), summed over the
    process's threads."""
    on_cpu = waiting = slices = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                a, b, c = f.read().split()
        except FileNotFoundError:  # the thread ended meanwhile (its time drops out of the sum;
            continue               # torch and trio keep their threads for the process's life)
        on_cpu, waiting, slices = on_cpu + int(a), waiting + int(b), slices + int(c)
    return on_cpu / 1e9, waiting / 1e9, slices


def measure(generate, prompt, new_tokens: int, pids: dict[str, int]) -> dict:
    before = {name: schedstat(pid) for name, pid in pids.items()}
    began = time.perf_counter()
    generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
    wall = time.perf_counter() - began
    result = {"wall_ms": wall / new_tokens * 1e3}
    for name, pid in pids.items():
        after = schedstat(pid)
        result[name] = {
            "cpu_ms": (after[0] - before[name][0]) / new_tokens * 1e3,
            "runqueue_ms": (after[1] - before[name][1]) / new_tokens * 1e3,
            "timeslices": (after[2] - before[name][2]) / new_tokens,
        }
    return result


def median_of(runs: list[dict]) -> dict:
    out: dict = {"wall_ms": round(statistics.median(r["wall_ms"] for r in runs), 2)}
    for name in runs[0]:
        if name != "wall_ms":
            out[name] = {k: round(statistics.median(r[name][k] for r in runs), 2) for k in runs[0][name]}
    out["cpu_ms_all_processes"] = round(sum(v["cpu_ms"] for k, v in out.items() if isinstance(v, dict)), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(SPLITS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / args.config, args.config)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        local = LocalModelForCausalLM.from_pretrained(path)
        with LocalSwarm(path, SPLITS[args.config][2], threads=1) as swarm, \
                DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            me = os.getpid()
            swarm_pids = {"client": me} | {f"node{i}": n.proc.pid for i, n in enumerate(swarm.nodes)}
            expected = local.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])  # warm-up
            if not torch.equal(model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[]), expected):
                raise SystemExit("the swarm's tokens differ from the local ones")
            local_runs, swarm_runs = [], []
            for _ in range(args.rounds):
                local_runs.append(measure(local.generate, prompt, args.new_tokens, {"local": me}))
                swarm_runs.append(measure(model.generate, prompt, args.new_tokens, swarm_pids))
    print(json.dumps({
        "config": args.config, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "spans": ",".join(f"{a}:{b}" for a, b in SPLITS[args.config][2]),
        "per_token": {"local": median_of(local_runs), "swarm_2_nodes": median_of(swarm_runs)},
    }, indent=2))


if __name__ == "__main__":
    main()
