#!/usr/bin/env python3
"""The main job: a local swarm of 3 `run-node` processes on the embedded tiny model, text
generated through it with the client library, the route and speed printed, the swarm stopped.

    python scripts/demo.py [--prompt TEXT] [--max-new-tokens N] [--model DIR] [--swarm-key FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default=str(ROOT / ".lamina" / "tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--swarm-key", default=None, metavar="FILE",
                    help="run a private swarm with this key file (make one with lamina-swarm-key)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)          # 3 nodes and this client share the machine's cores
    from pipeline import DistributedModelForCausalLM, LocalSwarm
    from pipeline.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(args.model)
    spans = [(0, 3), (3, 6), (6, 8)]
    print(f"starting 3 nodes serving {spans} of {model_dir} ...", flush=True)
    t0 = time.perf_counter()
    with LocalSwarm(model_dir, spans, log_dir=ROOT / ".lamina" / "logs", swarm_key=args.swarm_key) as swarm:
        for node in swarm.nodes:
            print(f"  node {node.peer_id[-8:]} serving blocks {node.start}:{node.end} at {node.addr}")
        print(f"swarm up in {time.perf_counter() - t0:.1f} s", flush=True)
        with DistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                         swarm_key=args.swarm_key) as model:
            ids = torch.tensor([model.tokenizer.encode(args.prompt)])
            with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as session:
                route = " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end})" for h in session.route)
                print(f"route: client -> {route} -> client")
                t1 = time.perf_counter()
                # the tiny model's weights are random: sample (seeded) so the text is not one
                # repeated token; it is still gibberish, by construction
                out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=[],
                                     do_sample=True, temperature=0.9, top_k=50, seed=args.seed)
                dt = time.perf_counter() - t1
            new = out.shape[1] - ids.shape[1]
            print(f"prompt: {args.prompt!r}")
            print(f"output: {model.tokenizer.decode(out[0])!r}  (random-init weights: gibberish by design)")
            print(f"{new} tokens in {dt:.2f} s: {new / dt:.1f} tokens/s through 3 nodes")
        codes = swarm.stop()
    print(f"swarm stopped (exit codes {codes})")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
