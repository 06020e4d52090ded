"""Generate from the shell.

    python -m pipeline generate --model DIR --prompt "Once upon a time" [--local | --initial-peers ... [--swarm-key FILE]
                                [--wire-format FORMAT]]
    python -m pipeline write-tiny DIR [--preset tiny|small|micro]
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default="smollm2",
                   help="checkpoint directory, .gguf file or Hugging Face hub id (cached); "
                        "default: smollm2, the embedded SmolLM2-135M-Instruct")
    g.add_argument("--prompt", default=None, help="text prompt (needs tokenizer.json)")
    g.add_argument("--input-ids", default=None, help="comma-separated token ids instead of --prompt")
    g.add_argument("--local", action="store_true", help="run every block in this process")
    g.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of swarm peers")
    g.add_argument("--swarm-key", default=None, metavar="FILE",
                   help="a private swarm's key file (as run-node --swarm-key; default: $LAMINA_SWARM_KEY)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop once the new text contains TEXT (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-eos", action="store_true", help="ignore EOS: always make --max-new-tokens")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="cpu")
    g.add_argument("--show-route", action="store_true", help="log the chosen route")
    g.add_argument("--wire-format", default=None, metavar="FORMAT",
                   help="how hidden states travel between nodes: model (the default: in --dtype), float16, "
                        "bfloat16, float32, int8 (steps of 64+ tokens int8 blockwise), int8:N, <dtype>+int8[:N]")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; use 1 when sharing cores)")
    w = sub.add_parser("write-tiny", help="write the embedded tiny model")
    w.add_argument("directory")
    w.add_argument("--preset", default="tiny")
    return p


def _input_ids(args, tokenizer):
    import torch

    if args.input_ids:
        try:
            ids = [int(x) for x in args.input_ids.split(",")]
        except ValueError:
            raise ValueError("--input-ids must be comma-separated integers") from None
        return torch.tensor([ids])
    if args.prompt is None:
        raise ValueError("give --prompt or --input-ids")
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer.json; use --input-ids")
    return torch.tensor([tokenizer.encode(args.prompt)])


class _PrintStreamer:
    """Prints new tokens as they come: text with a tokenizer (each token's piece as soon as it
    is whole, see `IncrementalDecoder`), else ids separated by spaces."""

    def __init__(self, tokenizer):
        from ._streamers import IncrementalDecoder

        self.first = True
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None

    def put(self, value):
        if self.first:
            self.first = False
            return
        token = int(value.reshape(-1)[0])
        if self.decoder is None:
            print(token, end=" ", flush=True)
        else:
            print(self.decoder.step(token), end="", flush=True)

    def end(self):
        print(self.decoder.flush() if self.decoder is not None else "", flush=True)


def _generate(args) -> int:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.stop:
        options["stop_strings"] = args.stop
    if args.no_eos:
        options["eos_token_id"] = []
    if args.local:
        if args.wire_format is not None:
            raise ValueError("--wire-format is how hidden states travel between nodes: not with --local")
        from ._local import LocalModelForCausalLM

        model = LocalModelForCausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        ids = _input_ids(args, model.tokenizer)
        t0 = time.perf_counter()
        out = model.generate(ids, streamer=_PrintStreamer(None if args.input_ids else model.tokenizer),
                             **options)
    else:
        from ._client import DistributedModelForCausalLM

        if not args.initial_peers:
            raise ValueError("give --initial-peers (or --local to run every block here)")
        with DistributedModelForCausalLM.from_pretrained(
                args.model, initial_peers=args.initial_peers, device=args.device, dtype=args.dtype,
                swarm_key=args.swarm_key, wire_format=args.wire_format) as model:
            ids = _input_ids(args, model.tokenizer)
            t0 = time.perf_counter()
            with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as session:
                if args.show_route:
                    hops = " -> ".join(f"{h.peer_id}[{h.start}:{h.end})" for h in session.route)
                    print(f"route: {hops}", file=sys.stderr)
                out = model.generate(ids, streamer=_PrintStreamer(None if args.input_ids else model.tokenizer),
                                     **options)
    new = out.shape[1] - ids.shape[1]
    dt = time.perf_counter() - t0
    print(f"[{new} tokens in {dt:.2f} s, {new / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ._errors import LaminaError

    try:
        if args.command == "write-tiny":
            from .tiny import write_tiny_model

            print(write_tiny_model(args.directory, args.preset))
            return 0
        return _generate(args)
    except (LaminaError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
