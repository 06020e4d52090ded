#!/usr/bin/env python3
"""Wire compression (issue 22): a long prefill through a 2-node swarm over 100 Mbit/s links, for
each wire format, and what each format does to the logits and the greedy tokens.

    sudo python scripts/bench_compression.py [--models tiny,wide,smollm2] [--formats model,float16,bfloat16,int8]
                                             [--prompt-tokens 2048] [--new-tokens 32] [--rate-mbit 100]
                                             [--delay-ms 2] [--repeats 2]

Per model: a NatLab internet (tests/netlab.py) with two public hosts, each running `run-node`
for half the blocks (`--num-threads 1`), and a client host; every host's outbound traffic goes
through the lab's link emulator at `--rate-mbit` with a one-way delay of `--delay-ms`
(`netlab.shape`). The client (this script again, `--worker`, in the client's namespace) runs,
for each format, after a warm-up generation, `--repeats` greedy generations of `--new-tokens`
tokens from a `--prompt-tokens` prompt, each in a fresh session (opened before the clock starts):

- `prefill_s`: the time to the first token (the prompt through both nodes, its result back,
  the head on the last position), least and median of the repeats;
- `decode_ms`: the median decode step;
- `hop_mb`: what one hop of the prefill carries (client -> node 1, node 1 -> node 2 and its echo
  to the client, node 2 -> client: four of them, two on node 1's link);
- `max_logit_error`: the largest logit difference from the `model` format (the model's own
  dtype: the local model's values) over a forward of the prompt and the reference's new tokens
  (teacher forcing: every position compared, so this also covers the new tokens' positions,
  whatever this format's greedy tokens did; a forward packs all of it, decode steps included:
  an upper bound for generation), with `logit_scale` (the largest reference logit) beside it;
- `first_divergence`: the first new token (0-based) where the greedy tokens differ from the
  `model` format's, None if they never do; then `lead_there`, the reference's top-1 over top-2
  logit margin at that token (a near tie or not).

Models: `tiny` (the tests' checkpoint: hidden 256, 8 blocks; written with
max_position_embeddings 4096 so that prompt and new tokens fit), `wide` (random-init, hidden
2048, 2 blocks, intermediate 1024: the bandwidth effect shows), `smollm2` (the embedded
SmolLM2-135M GGUF, computed in float32). The prompt is tiny.CORPUS repeated, cut to
`--prompt-tokens` of each model's tokenizer.

Prints one JSON object (progress on stderr). Needs root, `ip`, `nft` (the lab).

    python scripts/bench_compression.py --ablation [--models ...] [--prompt-tokens 2048]

runs no lab: in this process, per model, the forward of the prompt through two half spans with
each boundary (client -> span 1 -> span 2 -> client) rounded as a format would round it, against
the plain forward: the max logit error of float16, bfloat16, int8 blocks alone (one absmax
scale per 64 values, no outliers apart: `_blocks_only`, a reference implementation here) and
the int8 packing (`pipeline._wire_format`, 4 outliers per token apart).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from _clock import TokenClock  # noqa: E402

WIDE = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096)


def _log(text: str) -> None:
    print(f"[bench_compression {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def prompt_ids(tokenizer, n: int) -> list[int]:
    from pipeline.tiny import CORPUS

    text, ids = CORPUS, tokenizer.encode(CORPUS)
    while len(ids) < n:
        text += "\n" + CORPUS
        ids = tokenizer.encode(text)
    return ids[:n]


# -- the client, in its namespace ------------------------------------------------------------
def worker(args) -> int:
    """One JSON line per format; the first format is the reference (the model's dtype)."""
    import torch

    torch.set_num_threads(1)
    from pipeline import DistributedModelForCausalLM

    reference: dict = {}
    for fmt in args.formats.split(","):
        with DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer],
                                                         wire_format=None if fmt == "model" else fmt) as model:
            prompt = torch.tensor([prompt_ids(model.tokenizer, args.prompt_tokens)])
            model.generate(prompt[:, :8], max_new_tokens=2, eos_token_id=[])          # warm-up
            prefills, steps, full = [], [], None
            for _ in range(args.repeats):
                with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
                    clock = TokenClock()
                    out = model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[],
                                         streamer=clock, session=session)
                prefills.append(clock.ttft())
                steps += [b - a for a, b in zip(clock.times, clock.times[1:])]
                full = out[0] if full is None else full
            tokens = full[prompt.shape[1]:]
            forced = reference.get("tokens", full)   # teacher forcing on the reference's tokens
            with torch.no_grad():
                logits = model(forced[None, :-1]).logits.float()[0]
        record = {"format": fmt, "prefill_s": round(min(prefills), 3),
                  "prefill_median_s": round(statistics.median(prefills), 3),
                  "decode_ms": round(statistics.median(steps) * 1e3, 2)}
        if not reference:
            top = logits[prompt.shape[1] - 1:].topk(2, dim=-1).values
            reference = {"tokens": full, "new": tokens, "logits": logits, "leads": top[:, 0] - top[:, 1]}
        record.update(_compare(reference, tokens, logits))
        print(json.dumps(record), flush=True)
    return 0


def _compare(reference: dict, tokens, logits) -> dict:
    differ = (tokens != reference["new"]).nonzero()
    first = int(differ[0, 0]) if len(differ) else None
    return {"max_logit_error": float(f"{(logits - reference['logits']).abs().max().item():.4g}"),
            "logit_scale": round(reference["logits"].abs().max().item(), 2),
            "first_divergence": first,
            "lead_there": None if first is None else float(f"{reference['leads'][first].item():.3g}")}


# -- the lab ---------------------------------------------------------------------------------
def run_model(name: str, model_dir: str, args, logs: Path) -> dict:
    from netlab import NatLab, read_line, shape, stop
    from pipeline import load_config
    from pipeline.launch import spawn_node, wait_ready

    config = load_config(model_dir)
    half = config.num_hidden_layers // 2
    nodes: list[subprocess.Popen] = []
    with NatLab() as lab:
        hosts = [lab.add_public_host(f"n{i}") for i in range(2)] + [lab.add_public_host("client")]
        for host in hosts:
            shape(host, args.delay_ms, rate_mbit=args.rate_mbit)
        try:
            first = ""
            for i, (a, b) in enumerate([(0, half), (half, config.num_hidden_layers)]):
                argv = ["--blocks", f"{a}:{b}", "--listen", "/ip4/0.0.0.0/tcp/0", "--num-threads", "1",
                        *(["--initial-peers", first] if first else ["--new-swarm"])]
                log = logs / f"{name}-node{i}.log"
                nodes.append(spawn_node(model_dir, argv, log, prefix=hosts[i].wrap([])))
                node = wait_ready(nodes[-1], log, timeout=300)
                first = first or re.sub(r"^/ip4/[^/]+/", f"/ip4/{hosts[0].ip}/", node.addr)
            with open(logs / f"{name}-client.log", "wb") as client_log:
                work = hosts[2].popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--model",
                                       model_dir, "--peer", first, "--formats", args.formats,
                                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                                       str(args.new_tokens), "--repeats", str(args.repeats)],
                                      stdin=subprocess.DEVNULL, stderr=client_log)
            try:
                runs = []
                for _ in args.formats.split(","):
                    runs.append(json.loads(read_line(work, timeout=3600)))
                    _log(f"{name}: {runs[-1]}")
            finally:
                stop(work)
        finally:
            for proc in nodes:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    d = config.hidden_size
    for run in runs:
        run["hop_mb"] = round(_hop_bytes(run["format"], d, args.prompt_tokens) / 1e6, 2)
    return {"model": name, "hidden_size": d, "blocks": config.num_hidden_layers, "runs": runs}


def _hop_bytes(fmt: str, d: int, tokens: int) -> int:
    from pipeline._wire_format import WireFormat, packed_width

    wire = WireFormat.parse(None if fmt == "model" else fmt)
    if wire.int8_from is not None and tokens >= wire.int8_from:
        return tokens * packed_width(d)
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[wire.dtype or "float32"]
    return tokens * d * size


# -- the ablation: the packing with and without its outliers, in this process -------------------
def _blocks_only(x):
    """int8 by blocks of 64 with a float16 absmax scale each, and nothing apart."""
    import torch
    import torch.nn.functional as F

    b, t, d = x.shape
    nb = -(-d // 64)
    xb = F.pad(x.float(), (0, nb * 64 - d)).view(b, t, nb, 64)
    scale = (xb.abs().amax(-1) / 127).half().float()
    q = (xb / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).round().clamp(-127, 127)
    return (q * scale.unsqueeze(-1)).view(b, t, nb * 64)[..., :d]


def ablation(name: str, model_dir: str, args) -> dict:
    import torch

    from pipeline import LocalModelForCausalLM, load_span
    from pipeline._wire_format import decode_int8, encode_int8

    local = LocalModelForCausalLM.from_pretrained(model_dir)
    layers = local.config.num_hidden_layers
    spans = [load_span(model_dir, 0, layers // 2), load_span(model_dir, layers // 2, layers)]
    ids = torch.tensor([prompt_ids(local.tokenizer, args.prompt_tokens)])

    def forward(wire) -> torch.Tensor:
        h = wire(local.head.embed(ids))
        for span in spans:
            h = wire(span(h, 0, span.new_cache(1, ids.shape[1])))
        return local.head.logits(h).float()

    def int8(x):
        packed = encode_int8(x)
        return x if packed is None else decode_int8(packed, x.shape[-1])

    with torch.no_grad():
        reference = forward(lambda x: x)
        errors = {fmt: float(f"{(forward(wire) - reference).abs().max().item():.4g}") for fmt, wire in (
            ("float16", lambda x: x.half().float()), ("bfloat16", lambda x: x.bfloat16().float()),
            ("int8_blocks_only", _blocks_only), ("int8", int8))}
    return {"model": name, "logit_scale": round(reference.abs().max().item(), 2), "max_logit_error": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,wide,smollm2")
    ap.add_argument("--formats", default="model,float16,bfloat16,int8",
                    help="wire formats (the first is the reference: keep it `model`)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=2.0, help="one-way delay of every link")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--ablation", action="store_true", help="the codecs in this process, no lab (see above)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.formats.split(",")[0] != "model":
        ap.error("the first format is the reference: start --formats with model")
    from pipeline.tiny import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench_compression-") as tmp:
        logs = Path(args.log_dir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        paths = {"tiny": lambda: str(write_tiny_model(Path(tmp) / "tiny", "tiny", max_position_embeddings=4096)),
                 "wide": lambda: str(write_tiny_model(Path(tmp) / "wide", "tiny", **WIDE)),
                 "smollm2": lambda: "smollm2"}
        out = {"prompt_tokens": args.prompt_tokens, "models": []} if args.ablation else {
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rate_mbit": args.rate_mbit,
            "one_way_ms": args.delay_ms, "repeats": args.repeats, "models": []}
        for name in args.models.split(","):
            _log(f"{name} ...")
            if args.ablation:
                out["models"].append(ablation(name, paths[name](), args))
            else:
                out["models"].append(run_model(name, paths[name](), args, logs))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
