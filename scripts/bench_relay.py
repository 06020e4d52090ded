#!/usr/bin/env python3
"""What the client's relay costs: two nodes that cannot reach each other against two that can.

    sudo python scripts/bench_relay.py [--config tiny] [--rounds 20] [--new-tokens 64]

Four `run-node` processes, each in its own network namespace on one bridge (`tests/netlab.py`;
needs root, `ip` and `nft`): a1 and b1 serve the two halves of the model and cannot reach each
other (their packets to each other are dropped), a2 and b2 serve the same halves and can. The
client (this process, in the root namespace) reaches all four and generates over each pair in
turn, round after round, each generation in a new session: over a2 -> b2 the nodes push to each
other; over a1 -> b1 the first push fails and the client relays every step from a1 to b1
itself. Prints JSON: the first session's time to first token on each pair (on the relayed one
it includes the node's `PUSH_OPEN_GRACE` wait) and the median of the others' (the client
remembers the pair and relays from the first step), median decode tok/s, the paired median of
the milliseconds a relayed token adds, how many sessions each pair relayed, and whether every
generation produced the local tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _clock import TokenClock
from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(SPLITS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the first session is reported apart from the others")

    import netlab
    import torch

    from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM
    from pipeline.launch import LocalSwarm, start_node
    from pipeline.tiny import write_tiny_model

    why = netlab.available()
    if why is not None:
        raise SystemExit(f"cannot build the namespace lab: {why}")
    torch.set_num_threads(1)
    first_half, second_half = (f"{a}:{b}" for a, b in SPLITS[args.config][2])
    with tempfile.TemporaryDirectory() as tmp, netlab.NetLab() as lab:
        path = write_tiny_model(Path(tmp) / args.config, args.config)
        local = LocalModelForCausalLM.from_pretrained(path)
        prompt = torch.randint(0, local.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        expected = local.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
        del local
        a1, b1, a2, b2 = (lab.add_host() for _ in range(4))
        lab.cut(a1, b1)

        def node_args(host, blocks, join):
            return ["--blocks", blocks, "--listen", f"/ip4/{host.ip}/tcp/0", "--num-threads", "1",
                    *(["--initial-peers", join] if join else ["--new-swarm"])]

        swarm = LocalSwarm(path, [], log_dir=tmp)      # holds the nodes, for its stop()
        try:
            swarm.nodes.append(start_node(path, node_args(a2, first_half, None), Path(tmp) / "a2.log",
                                          prefix=a2.wrap([])))
            boot = swarm.nodes[0].addr
            for name, h, blocks in (("b2", b2, second_half), ("a1", a1, first_half), ("b1", b1, second_half)):
                swarm.nodes.append(start_node(path, node_args(h, blocks, boot), Path(tmp) / f"{name}.log",
                                              prefix=h.wrap([])))
            direct_ids = [swarm.nodes[0].peer_id, swarm.nodes[1].peer_id]
            relayed_ids = [swarm.nodes[2].peer_id, swarm.nodes[3].peer_id]
            max_length = prompt.shape[1] + args.new_tokens
            with DistributedModelForCausalLM.from_pretrained(path, initial_peers=[boot], allowed_servers=direct_ids) as direct, \
                    DistributedModelForCausalLM.from_pretrained(path, initial_peers=[boot], allowed_servers=relayed_ids) as relayed:
                sides = {"direct": direct, "relayed": relayed}
                ttft: dict[str, list[float]] = {name: [] for name in sides}
                rates: dict[str, list[float]] = {name: [] for name in sides}
                relay: dict[str, list[bool]] = {name: [] for name in sides}
                equal = True
                for _ in range(args.rounds):
                    for name, model in sides.items():
                        clock = TokenClock()
                        with model.inference_session(max_length=max_length) as session:
                            out = model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[],
                                                 streamer=clock, session=session)
                            relay[name].append(session.chain.links[0].relay)
                        ttft[name].append(clock.ttft())
                        rates[name].append(clock.decode_tok_s())
                        equal = equal and torch.equal(out, expected)
        finally:
            swarm.stop()
    added = [1e3 / r - 1e3 / d for r, d in zip(rates["relayed"], rates["direct"])]
    print(json.dumps({
        "config": args.config, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "ttft_s_first_session": {name: round(v[0], 3) for name, v in ttft.items()},
        "ttft_s_median_later_sessions": {name: round(statistics.median(v[1:]), 3) for name, v in ttft.items()},
        "decode_tok_s": {name: round(statistics.median(v), 1) for name, v in rates.items()},
        "relay_added_ms_per_token_paired_median": round(statistics.median(added), 2),
        "relayed_sessions": {name: sum(v) for name, v in relay.items()},
        "tokens_equal_local": equal,
    }, indent=2))


if __name__ == "__main__":
    main()
