"""run-gateway: an OpenAI-compatible HTTP API, the swarm map page and Prometheus metrics for a swarm.

    run-gateway                                       # a local 3-node swarm of the embedded SmolLM2
    run-gateway --initial-peers /ip4/.../p2p/... --port 8000   # an existing swarm
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'

Open http://HOST:PORT/ for the swarm map; /metrics for Prometheus. Once serving it prints one
line to stdout: ``gateway serving http://HOST:PORT model NAME``. SIGTERM or Ctrl-C stops it
(and a local swarm's nodes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

PROG = "run-gateway"


def _parser() -> argparse.ArgumentParser:
    from ._gateway import GatewayConfig

    d = GatewayConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory, .gguf file or name (default: smollm2, "
                                                 "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR",
                   help="multiaddrs of a swarm's peers (default: start a local swarm)")
    p.add_argument("--swarm-key", default=None, metavar="FILE", help="a private swarm's key file")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0: any free port)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients use (default: smollm2, or the checkpoint's file name)")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, metavar="N",
                   help=f"generations running at once (default {d.max_sessions})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"requests waiting for a slot before new ones get 429 (default {d.max_queue})")
    p.add_argument("--max-tokens", type=int, default=d.default_max_tokens, metavar="N",
                   help=f"a chat completion's max_tokens when the request gives none (default {d.default_max_tokens})")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout, metavar="SECONDS")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the local swarm (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and per local node")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


async def _serve(config) -> None:
    import trio

    from ._gateway import serve_gateway

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_gateway, config)
        from ._gateway import served_name

        print(f"gateway serving {' '.join(binds)} model {config.served_name or served_name(config.model)}",
              flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def _run(args) -> int:
    import trio

    from ._gateway import GatewayConfig

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    swarm = None
    peers = list(args.initial_peers)
    try:
        if not peers:
            from ._chat_cli import _model_path, _start_swarm

            path = _model_path(args.model)
            print(f"{PROG}: starting {args.nodes} local nodes of {path.name} ...", file=sys.stderr, flush=True)
            swarm = _start_swarm(path, args.nodes, args.threads or 1)
            peers = swarm.initial_peers
            print(f"{PROG}: {len(swarm.nodes)} nodes serve blocks "
                  + ", ".join(f"{n.start}:{n.end}" for n in swarm.nodes), file=sys.stderr, flush=True)
        config = GatewayConfig(model=args.model, initial_peers=tuple(peers), swarm_key=args.swarm_key,
                               host=args.host, port=args.port, served_name=args.served_model_name,
                               max_sessions=args.max_sessions, max_queue=args.max_queue,
                               default_max_tokens=args.max_tokens, dtype=args.dtype,
                               connect_timeout=args.connect_timeout)
        trio.run(_serve, config)
    finally:
        if swarm is not None:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)   # stopping the nodes is not cut short
            try:
                swarm.__exit__(None, None, None)
            finally:
                signal.signal(signal.SIGINT, previous)
    return 0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    from ._errors import LaminaError

    signal.signal(signal.SIGTERM, _terminate)   # while a local swarm starts: stop its nodes too
    try:
        return _run(args)
    except (LaminaError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
