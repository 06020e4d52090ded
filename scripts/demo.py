#!/usr/bin/env python3
"""The main job: a local swarm of 3 `run-node` processes splits the embedded instruct model
(SmolLM2-135M-Instruct, 30 blocks: 3 x 10) between them; the client library asks it a question
with the model's chat template, streams the answer as it comes, says which nodes served which
blocks and how fast, and stops the swarm.

    python scripts/demo.py [--question TEXT] [--max-new-tokens N] [--model MODEL] [--nodes N]
                           [--swarm-key FILE]

With a model that has no chat template (e.g. `--model tiny`, the random-init test model) the
question is continued as plain text instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START = float(os.environ.get("LAMINA_DEMO_T0") or time.time())   # demo.sh sets it before installing
QUESTION = "What is the capital of France, and what is it famous for?"


def _model(name: str) -> Path:
    if name == "tiny":
        from pipeline.tiny import ensure_tiny_model

        return Path(ensure_tiny_model(ROOT / ".lamina" / "tiny"))
    from pipeline import resolve_checkpoint

    return resolve_checkpoint(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (the embedded SmolLM2-135M-Instruct, default), tiny, or a checkpoint")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--swarm-key", default=None, metavar="FILE",
                    help="run a private swarm with this key file (make one with lamina-swarm-key)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)          # the nodes and this client share the machine's cores
    from pipeline import DistributedModelForCausalLM, LaminaError, LocalSwarm, load_config
    from pipeline._chat_cli import spans

    try:
        model_path = _model(args.model)
        layers = load_config(model_path).num_hidden_layers
    except LaminaError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    parts = spans(layers, args.nodes)
    print(f"starting {len(parts)} nodes serving blocks {', '.join(f'{a}:{b}' for a, b in parts)} "
          f"of {model_path.name} ({layers} blocks) ...", flush=True)
    t0 = time.perf_counter()
    with LocalSwarm(model_path, parts, log_dir=ROOT / ".lamina" / "logs", swarm_key=args.swarm_key) as swarm:
        for node in swarm.nodes:
            print(f"  node {node.peer_id[-8:]} serving blocks {node.start}:{node.end} at {node.addr}")
        print(f"swarm up in {time.perf_counter() - t0:.1f} s", flush=True)
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers,
                                                         swarm_key=args.swarm_key) as model:
            tokens = _ask(model, args)
        codes = swarm.stop()
    print(f"swarm stopped (exit codes {codes})")
    return 0 if tokens > 0 and all(c == 0 for c in codes) else 1


def _ask(model, args) -> int:
    """Asks the question through the swarm, streaming the answer; returns the tokens made."""
    import torch

    tok = model.tokenizer
    chat = tok is not None and tok.chat_template is not None
    prompt = args.question
    ids = (tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True),
                      add_special_tokens=False) if chat else tok.encode(prompt))
    first = []

    def show(text: str) -> None:
        if not first:
            first.append(time.time())
        print(text, end="", flush=True)

    with model.inference_session(max_length=len(ids) + args.max_new_tokens) as session:
        print(f"\nyou> {prompt}\nmodel> ", end="", flush=True)
        t1 = time.perf_counter()
        if chat:
            model.chat([{"role": "user", "content": prompt}], max_new_tokens=args.max_new_tokens, streamer=show)
            new = session.position - len(ids) + 1   # the last token (eos or the limit) is never fed back
        else:
            # the tiny model's weights are random: sample (seeded) so the text is not one token
            # repeated; it is gibberish by construction
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, eos_token_id=[],
                                 do_sample=True, temperature=0.9, top_k=50, seed=0)
            new = out.shape[1] - len(ids)
            show(tok.decode(out[0, len(ids):]))
        dt = time.perf_counter() - t1
        print("\n")
        hops = session.route
        route = " -> ".join(f"node {h.peer_id[-8:]} [blocks {h.start}:{h.end})" for h in hops)
        print(f"served by {len(hops)} nodes: client -> {route} -> client")
    print(f"{new} new tokens in {dt:.2f} s: {new / dt:.1f} tokens/s (the {len(ids)}-token prompt's prefill included); "
          f"the first was streamed {first[0] - START:.1f} s after the command started" if first else "no tokens")
    return new


if __name__ == "__main__":
    sys.exit(main())
