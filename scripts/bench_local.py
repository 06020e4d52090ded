#!/usr/bin/env python3
"""Local engine speed: lamina vs transformers on the same checkpoint, dtype and machine.

Prints JSON: prefill tokens/s (one prompt of --prefill tokens) and decode tokens/s (batch 1,
greedy, --decode steps after a 32-token prompt), best of --repeats, for the embedded tiny model
and a ~100M-parameter Llama config. transformers runs its own forward loop with its default
DynamicCache (what `generate` uses), so its generate() overhead is not counted against it.

    python scripts/bench_local.py [--configs tiny,100m] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import load_client_head, load_span  # noqa: E402
from pipeline.tiny import write_tiny_model  # noqa: E402

CONFIGS = {
    "tiny": dict(preset="tiny"),
    # ~110M parameters
    "100m": dict(preset="tiny", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=16000),
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_lamina(path, dtype, prefill, decode, repeats):
    head = load_client_head(path, dtype=dtype)
    span = load_span(path, 0, head.config.num_hidden_layers, dtype=dtype)
    prompt = torch.randint(0, head.config.vocab_size, (1, prefill))

    def run_prefill():
        cache = span.new_cache(1, prefill)
        head.logits(span(head.embed(prompt), 0, cache)[:, -1])

    def run_decode():
        cache = span.new_cache(1, 32 + decode)
        logits = head.logits(span(head.embed(prompt[:, :32]), 0, cache)[:, -1])
        t0 = time.perf_counter()
        for pos in range(32, 32 + decode):
            tok = logits.argmax(-1, keepdim=True)
            logits = head.logits(span(head.embed(tok), pos, cache)[:, -1])
        return time.perf_counter() - t0

    run_prefill(); run_decode()                                   # warm up
    t_prefill = best(run_prefill, repeats)
    t_decode = min(run_decode() for _ in range(repeats))
    return prefill / t_prefill, decode / t_decode


def bench_transformers(path, dtype, prefill, decode, repeats):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, prefill))

    @torch.inference_mode()
    def run_prefill():
        hf(prompt, use_cache=True)

    @torch.inference_mode()
    def run_decode():
        out = hf(prompt[:, :32], use_cache=True)
        t0 = time.perf_counter()
        for _ in range(decode):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out = hf(tok, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0

    run_prefill(); run_decode()
    t_prefill = best(run_prefill, repeats)
    t_decode = min(run_decode() for _ in range(repeats))
    return prefill / t_prefill, decode / t_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "dtype": args.dtype, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            spec = dict(CONFIGS[name])
            path = write_tiny_model(Path(tmp) / name, spec.pop("preset"), **spec)
            params = sum(t.numel() for t in load_client_head(path).state_dict().values())
            params += sum(t.numel() for t in load_span(path, 0, 1).state_dict().values()) * \
                load_client_head(path).config.num_hidden_layers
            torch.manual_seed(0)
            lp, ld = bench_lamina(path, dtype, args.prefill, args.decode, args.repeats)
            torch.manual_seed(0)
            hp, hd = bench_transformers(path, dtype, args.prefill, args.decode, args.repeats)
            results["configs"][name] = {
                "params_m": round(params / 1e6, 1),
                "lamina": {"prefill_tok_s": round(lp, 1), "decode_tok_s": round(ld, 1)},
                "transformers": {"prefill_tok_s": round(hp, 1), "decode_tok_s": round(hd, 1)},
                "ratio": {"prefill": round(lp / hp, 2), "decode": round(ld / hd, 2)},
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
