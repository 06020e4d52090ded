#!/usr/bin/env python3
"""Swarm vs local, on one machine: decode tokens/s and time to first token (TTFT) for the same
checkpoint run locally and through 2- and 3-node loopback swarms of real `run-node` processes;
and the failover stall (SIGKILL of the serving middle node -> next token).

    python scripts/bench_swarm.py [--configs tiny,small] [--new-tokens 64] [--repeats 3]
    python scripts/bench_swarm.py --model smollm2      # the embedded SmolLM2-135M-Instruct (GGUF)

`--configs` names random-init test models written here (tiny, small) or `smollm2`, the embedded
model (float32, as its quantized weights are dequantized to). `--model` is `--configs`.

Threads: every process (the local baseline, each node, the client) runs torch with
`--threads` intra-op threads (default 1), so the ratio measures what the network path costs,
not how the cores were shared; `local_2_threads` is reported beside it for reference.
Decode rate = (new tokens - 1) / (last token time - first token time); TTFT includes opening
the session on every node. Best of `--repeats` runs each. The ratios compare each swarm with
local runs made alternately with its own runs (the machine's speed drifts on a shared VM);
`local` is the same measured once up front. `decode_ratio_vs_local` is best swarm run / best
local run; `decode_ratio_paired_median` is the median over the alternating pairs of (swarm run
/ the local run just before it), which the drift distorts less.

Many clients (issue 22), instead of the above:

    python scripts/bench_swarm.py --clients 16 [--links loopback,25] [--configs tiny]
    sudo python scripts/bench_swarm.py --clients 4,16 --links 25     # emulated links need root

N concurrent clients generate greedy tokens through one 3-node swarm (`SPLITS[name][3]`), on
loopback (`LocalSwarm`) or over emulated links of the given one-way delay in ms (the nodes and
every client on its own shaped public host of a NatLab internet, as in bench_wan.py:
scripts/_wanlab.py). 1 client always runs too: the ratio's baseline. Every (link, N) gets a
fresh swarm, so the nodes' batching statistics are its own.

Each client is its own process (scripts/_clients.py: forked from a server that imported torch
and lamina once, which spares each client about 5 s of CPU), with its own libp2p identity,
connections and event loop, as real clients are; on a lab link, inside its own host's network
namespace. Each has its own prompt (`--prompt` random ids, seeded; a prompt whose local
greedy reference has a choice leading by less than 1e-4 is drawn again) and `--threads` torch
threads. It loads the client head, warms its connections with a 4-token generation, says
ready, and waits; at most `--start-parallel` clients (default: the core count) start at once
(all at once starved the nodes). Then `--repeats` rounds: all clients are told to go at once,
each runs one `generate` of `--new-tokens` tokens (a new session: its opening is in the TTFT)
and reports its token times. Times come from the one monotonic clock every process on this
machine shares.

Per (link, N), from the round with the best aggregate (every round's aggregate is listed):
- `aggregate_decode_tok_s`: tokens after each client's first / (the last client's last token -
  the first client's first token); with 1 client, the usual decode rate;
- `steady_tok_s`: tokens in the window where every client is decoding (the latest first token
  to the earliest last one) / that window; `end_to_end_tok_s`: all new tokens / (the last token
  - go), TTFT included;
- `per_client_tok_s` p50 and min (each client's own decode rate), `ttft_ms` p50 and p99
  (nearest rank: the max for fewer than 100 clients), from go to that client's first token;
- `ratio_vs_1_client`: aggregate / the 1-client aggregate on the same link;
- `cpu`: CPU seconds of the clients, of the nodes and of the lab's userspace link emulators
  during the round, and how many of the machine's cores they kept busy (they all share this
  machine's cores: on a small machine the clients' own CPU work limits the aggregate too);
- `batching`: each node's forward passes, how many held several sessions' steps, and segments
  per pass, from the statistics it logs when it drains (its whole life: the warm-ups too);
- `tokens_equal_local`: every client's tokens in every round against the local model's for its
  prompt. As every reference choice leads by 1e-4 or more (batching changes logits by about
  1e-6; docs/architecture.md, "What exactness lamina promises"), a mismatch is a bug: it is
  listed with the position and the reference's lead there, printed as WRONG TOKENS on stderr,
  and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _clock import TokenClock
from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM, load_config, resolve_checkpoint  # noqa: E402
from pipeline.launch import LocalSwarm  # noqa: E402
from pipeline.tiny import write_tiny_model  # noqa: E402

FAILOVER = {"tiny": [(0, 3), (3, 6), (3, 6), (6, 8)], "small": [(0, 6), (6, 11), (6, 11), (11, 16)],
            "smollm2": [(0, 10), (10, 20), (10, 20), (20, 30)]}


def run(generate, prompt, new_tokens, repeats):
    best_ttft, best_decode, out = float("inf"), 0.0, None
    for _ in range(repeats):
        clock = TokenClock()
        out = generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        ttft, decode = clock.ttft(), clock.decode_tok_s()
        best_ttft, best_decode = min(best_ttft, ttft), max(best_decode, decode)
    return best_ttft, best_decode, out


def bench_config(name: str, path: Path, args) -> dict:
    prompt = torch.randint(0, 4096, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    result: dict = {}
    local = LocalModelForCausalLM.from_pretrained(path)
    torch.set_num_threads(2)
    ttft, decode, _ = run(local.generate, prompt, args.new_tokens, args.repeats)
    result["local_2_threads"] = {"ttft_ms": round(ttft * 1e3, 1), "decode_tok_s": round(decode, 1)}
    torch.set_num_threads(args.threads)
    ttft, decode, expected = run(local.generate, prompt, args.new_tokens, args.repeats)
    result["local"] = {"ttft_ms": round(ttft * 1e3, 1), "decode_tok_s": round(decode, 1)}
    for n, spans in SPLITS[name].items():
        t0 = time.perf_counter()
        with LocalSwarm(path, spans, threads=args.threads) as swarm, \
                DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            up = time.perf_counter() - t0
            clock = TokenClock()
            model.generate(prompt, max_new_tokens=4, eos_token_id=[], streamer=clock)  # warms connections
            cold = clock.times[0] - t0
            # Local and swarm runs alternate (the nodes idle during local runs), so a drift in
            # the machine's speed (a shared VM's is large) hits both sides of the ratio alike.
            best = {"local": (float("inf"), 0.0), "swarm": (float("inf"), 0.0)}
            pairs = []
            for _ in range(args.repeats):
                pair = {}
                for side, generate in (("local", local.generate), ("swarm", model.generate)):
                    t, d, o = run(generate, prompt, args.new_tokens, 1)
                    best[side] = (min(best[side][0], t), max(best[side][1], d))
                    pair[side] = d
                    if side == "swarm":
                        out = o
                pairs.append(pair["swarm"] / pair["local"])
        (ttft, decode), (local_ttft, local_decode) = best["swarm"], best["local"]
        result[f"swarm_{n}"] = {
            "ttft_ms": round(ttft * 1e3, 1), "decode_tok_s": round(decode, 1),
            "swarm_start_s": round(up, 2), "start_to_first_token_s": round(cold, 2),
            "local_alternating_decode_tok_s": round(local_decode, 1),
            "decode_ratio_vs_local": round(decode / local_decode, 2),
            "decode_ratio_paired_median": round(statistics.median(pairs), 2),
            "ttft_ratio_vs_local": round(ttft / local_ttft, 2),
            "added_ms_per_token": round(1e3 / decode - 1e3 / local_decode, 2),
            "tokens_equal_local": bool(torch.equal(out, expected)),
        }
    del local
    result["failover"] = failover(path, FAILOVER[name], prompt, expected, args)
    return result


def failover(path: Path, spans, prompt, expected, args) -> dict:
    kill_at = args.new_tokens // 3
    with LocalSwarm(path, spans, threads=args.threads) as swarm, \
            DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
            killed = {}

            def on_token(count: int) -> None:
                if count == kill_at:
                    victim = next(node for node in swarm.nodes if node.peer_id == session.route[1].peer_id)
                    victim.signal(signal.SIGKILL)
                    killed["t"] = time.perf_counter()
                    killed["index"] = count

            clock = TokenClock(on_token)
            out = model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[],
                                 streamer=clock, session=session)
            stall = clock.times[killed["index"]] - killed["t"]
            normal = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))[len(clock.times) // 2]
            return {"stall_ms": round(stall * 1e3, 1), "median_token_ms": round(normal * 1e3, 1),
                    "failovers": session.chain.failovers, "tokens_equal_local": bool(torch.equal(out, expected))}


# -- many clients (issue 22) ---------------------------------------------------------------------
LOOPBACK = "loopback"
NEAR_TIE = 1e-4           # a greedy choice leading by less may flip under batching's rounding (logits)
OPENED_BY = re.compile(r"session \S+ opened by (\S+):")
BATCH_LINE = re.compile(r"left the swarm \((\d+) forward passes, (\d+) of them batched, ([\d.]+) segments per pass, "
                        r"(\d+) tokens, ([\d.]+) s computing\)")


def references(path: Path, n: int, length: int, new_tokens: int, repeats: int
               ) -> tuple[list[list[int]], list[list[int]], list[list[float]], float, int]:
    """`n` prompts of `length` random ids whose greedy references are decisive (every choice
    leads the runner-up by at least NEAR_TIE in logits: a prompt with a closer choice is drawn
    again, so a token that differs under batching's rounding is a bug, not a tie); the local
    model's tokens for each, the lead of each choice, the local decode rate (tokens/s, best of
    `repeats`, first prompt), and how many prompts were drawn again."""
    local = LocalModelForCausalLM.from_pretrained(path)
    vocab = load_config(path).vocab_size
    g = torch.Generator().manual_seed(22)
    prompts, expected, leads, redrawn = [], [], [], 0
    while len(prompts) < n:
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        out = local.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, eos_token_id=[])
        with torch.no_grad():
            logits = local(out).logits[0, length - 1:-1].float()
        top = logits.topk(2, dim=-1).values
        lead = (top[:, 0] - top[:, 1]).tolist()
        if min(lead) < NEAR_TIE:
            redrawn += 1
            if redrawn > 10 * n:
                raise RuntimeError("no decisive prompts for this model: its greedy choices are near ties")
            continue
        prompts.append(prompt)
        expected.append(out[0, length:].tolist())
        leads.append(lead)
    _, decode, _ = run(local.generate, torch.tensor([prompts[0]]), new_tokens, repeats)
    return prompts, expected, leads, decode, redrawn


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def drive(clients, node_pids: list[int], emulator_pids: list[int], rounds: int) -> list[dict]:
    """`rounds` rounds of the ready `clients`: each round's reports and machine measures."""
    from _clients import run_round

    results = []
    for _ in range(rounds):
        nodes, emulators, load = _cpu(node_pids), _cpu(emulator_pids), os.getloadavg()[0]
        reports = run_round(clients)
        results.append({"reports": reports, "nodes_cpu_s": _cpu(node_pids) - nodes,
                        "emulators_cpu_s": _cpu(emulator_pids) - emulators,
                        "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]})
    return results


def summarize_round(result: dict, expected: list[list[int]], leads: list[list[float]], index: int) -> dict:
    reports = result["reports"]
    failed = [(i, r["error"]) for i, r in enumerate(reports) if "error" in r]
    if failed:
        return {"round": index, "errors": [{"client": i, "error": e} for i, e in failed]}
    firsts = [r["times"][0] for r in reports]
    lasts = [r["times"][-1] for r in reports]
    decode_tokens = sum(len(r["times"]) - 1 for r in reports)
    lo, hi = max(firsts), min(lasts)
    steady = sum(lo < t <= hi for r in reports for t in r["times"]) / (hi - lo) if hi > lo else None
    per_client = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in reports]
    ttfts = [r["times"][0] - r["t0"] for r in reports]
    wall = max(lasts) - min(firsts)
    mismatches = []
    for i, r in enumerate(reports):
        if r["tokens"] != expected[i]:
            at = next((k for k, (a, b) in enumerate(zip(r["tokens"], expected[i])) if a != b),
                      min(len(r["tokens"]), len(expected[i])))
            lead = leads[i][at] if at < len(leads[i]) else None
            mismatches.append({"round": index, "client": i, "first_wrong_token": at, "reference_lead": lead})
    clients_cpu = sum(r["cpu_s"] for r in reports)
    busy = clients_cpu + result["nodes_cpu_s"] + result["emulators_cpu_s"]
    return {
        "round": index,
        "aggregate_decode_tok_s": decode_tokens / wall,
        "steady_tok_s": steady,
        "end_to_end_tok_s": sum(len(r["times"]) for r in reports) / (max(lasts) - min(r["t0"] for r in reports)),
        "per_client_tok_s_p50": statistics.median(per_client),
        "per_client_tok_s_min": min(per_client),
        "ttft_ms_p50": statistics.median(ttfts) * 1e3,
        "ttft_ms_p99": _pct(ttfts, 99) * 1e3,
        "decode_wall_s": wall,
        "cpu": {"clients_s": clients_cpu, "nodes_s": result["nodes_cpu_s"],
                "link_emulators_s": result["emulators_cpu_s"],
                "cores_busy": busy / (max(lasts) - min(r["t0"] for r in reports))},
        "load_avg_1min": result["load_avg_1min"],
        "mismatches": mismatches,
    }


def batching(logs: list[Path]) -> list[dict]:
    """Each node's batching statistics from the line it logs when it leaves the swarm."""
    nodes = []
    for log in logs:
        m = BATCH_LINE.search(log.read_text(errors="replace")) if log.exists() else None
        if m is None:
            nodes.append({"log": str(log), "stats": "missing (the node did not drain)"})
            continue
        nodes.append({"passes": int(m[1]), "batched_passes": int(m[2]), "segments_per_pass": float(m[3]),
                      "tokens": int(m[4]), "compute_s": float(m[5])})
    return nodes


def run_clients(ctx, name: str, path: Path, link: str, n: int, prompts, expected, leads, args, logs: Path) -> dict:
    """One (link, N clients) configuration on a fresh 3-node swarm."""
    from _clients import ClientSpec, close_clients, start_clients

    spans = SPLITS[name][3]
    tag = f"{name}-{link}-c{n}"
    node_args = ["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []

    def specs(peer: str, netns: list[str | None]) -> list[ClientSpec]:
        return [ClientSpec(str(path), peer, prompts[i], args.new_tokens, args.threads,
                           str(logs / f"{tag}-client{i}.log"), netns[i]) for i in range(n)]

    began = time.perf_counter()
    clients: list = []
    if link == LOOPBACK:
        with LocalSwarm(path, spans, threads=args.threads, extra_args=node_args, log_dir=logs / tag) as swarm:
            node_logs = [node.log_path for node in swarm.nodes]
            try:
                ready_s = start_clients(ctx, specs(swarm.initial_peers[0], [None] * n), args.start_parallel, clients)
                rounds = drive(clients, [node.proc.pid for node in swarm.nodes], [], args.repeats)
            finally:
                close_clients(clients)
    else:
        from _wanlab import wan_swarm

        with wan_swarm(path, spans, float(link), logs, tag, threads=args.threads, extra_args=node_args,
                       graceful=True) as swarm:
            node_logs = swarm.logs
            try:
                hosts = [swarm.add_client(f"c{i}") for i in range(n)]
                ready_s = start_clients(ctx, specs(swarm.first, [host.netns for host in hosts]), args.start_parallel,
                                        clients)
                rounds = drive(clients, [proc.pid for proc in swarm.nodes], [proc.pid for proc in swarm.emulators],
                               args.repeats)
            finally:
                close_clients(clients)
    summaries = [summarize_round(r, expected, leads, k) for k, r in enumerate(rounds)]
    errors = [e for s_ in summaries for e in s_.get("errors", [])]
    good = [s_ for s_ in summaries if "errors" not in s_]
    best = max(good, key=lambda s_: s_["aggregate_decode_tok_s"], default=None)
    nodes = batching(node_logs)
    first_log = node_logs[0].read_text(errors="replace") if node_logs[0].exists() else ""
    out = {
        "link": link if link == LOOPBACK else f"{float(link):g} ms one-way",
        "clients": n,
        **({k: v for k, v in best.items() if k not in ("mismatches", "round")} if best else {}),
        "best_round": best["round"] if best else None,
        "rounds_aggregate_tok_s": [s_.get("aggregate_decode_tok_s") for s_ in summaries],
        "batching": nodes,
        "batching_kicked_in": any(isinstance(x.get("batched_passes"), int) and x["batched_passes"] > 0 for x in nodes),
        "clients_ready_s": ready_s,
        "client_identities": len(set(OPENED_BY.findall(first_log))),   # peers that opened sessions on node 0
        "config_wall_s": time.perf_counter() - began,
        "errors": errors,
        "mismatches": [m for s_ in summaries for m in s_.get("mismatches", [])],
    }
    out["tokens_equal_local"] = not out["mismatches"] and not errors
    return _round_floats(out)


def _round_floats(value):
    if isinstance(value, float):
        return float(f"{value:.3g}") if abs(value) < 1 else round(value, 2)
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round_floats(v) for v in value]
    return value


def bench_clients(name: str, path: Path, args, logs: Path) -> dict:
    from _clients import client_context

    counts = sorted({1, *(int(x) for x in args.clients.split(","))})
    links = [x.strip() for x in args.links.split(",")]
    for link in links:
        if link != LOOPBACK:
            float(link)      # a one-way delay in ms
            from netlab import nat_available

            if (why := nat_available()) is not None:
                raise SystemExit(f"--links {link}: the emulated links need the NAT lab, which cannot run here: {why}")
    torch.set_num_threads(args.threads)
    prompts, expected, leads, local_decode, redrawn = references(path, max(counts), args.prompt, args.new_tokens,
                                                                 args.repeats)
    ctx = client_context()
    result: dict = {"local_decode_tok_s": round(local_decode, 1),
                    "min_reference_lead": float(f"{min(min(x) for x in leads):.3g}"), "prompts_redrawn": redrawn,
                    "runs": []}
    for link in links:
        base = None
        for n in counts:
            print(f"[bench_swarm {time.strftime('%H:%M:%S')}] {name}: {n} client(s), link {link} ...",
                  file=sys.stderr, flush=True)
            rec = run_clients(ctx, name, path, link, n, prompts, expected, leads, args, logs)
            if n == 1:
                base = rec.get("aggregate_decode_tok_s")
            if base and rec.get("aggregate_decode_tok_s"):
                rec["ratio_vs_1_client"] = round(rec["aggregate_decode_tok_s"] / base, 2)
            print(f"[bench_swarm] {json.dumps({k: v for k, v in rec.items() if k != 'batching'})}",
                  file=sys.stderr, flush=True)
            if not rec["tokens_equal_local"]:
                print(f"!!! WRONG TOKENS: {name}, {n} clients, link {link}: {rec['mismatches'] or rec['errors']}",
                      file=sys.stderr, flush=True)
            result["runs"].append(rec)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", "--model", default=None,
                    help="tiny, small, smollm2 (default: tiny,small; with --clients: tiny)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", default=None,
                    help="many clients: concurrent client counts, e.g. 16 or 4,16 (1 always runs too)")
    ap.add_argument("--links", default=LOOPBACK,
                    help="with --clients: 'loopback' and/or one-way link delays in ms, e.g. loopback,25")
    ap.add_argument("--max-batch-size", type=int, default=None, help="with --clients: the nodes' --max-batch-size")
    ap.add_argument("--start-parallel", type=int, default=os.cpu_count() or 2,
                    help="with --clients: clients starting (importing, loading, warming up) at once")
    ap.add_argument("--log-dir", default=None, help="with --clients: keep the nodes' and clients' logs here")
    args = ap.parse_args()
    configs = args.configs or ("tiny" if args.clients else "tiny,small")
    out = {"threads_per_process": args.threads, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt,
           "torch": torch.__version__, "configs": {}}
    if args.clients:
        out.update(repeats=args.repeats, max_batch_size=args.max_batch_size, start_parallel=args.start_parallel,
                   cores=os.cpu_count(),
                   load_avg_at_start=[round(x, 2) for x in os.getloadavg()])
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs.split(","):
            path = resolve_checkpoint(name) if name == "smollm2" else write_tiny_model(Path(tmp) / name, name)
            if args.clients:
                logs = Path(args.log_dir or tmp) / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                out["configs"][name] = bench_clients(name, path, args, logs)
            else:
                out["configs"][name] = bench_config(name, path, args)
    print(json.dumps(out, indent=2))
    wrong = [(name, run_["clients"], run_["link"]) for name, c in out["configs"].items() for run_ in c.get("runs", [])
             if not run_["tokens_equal_local"]]
    if wrong:
        print(f"!!! WRONG TOKENS (or failed clients) in {wrong}: see mismatches/errors above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
