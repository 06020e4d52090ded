"""`lamina-bootstrap`: a swarm's meeting point, with no model: the peer new nodes and clients
dial first (`--initial-peers`), a relay for nodes behind NATs, and a replica of the swarm state.

Run it on a machine others can reach (a public IP, or a port forwarded to it)::

    lamina-bootstrap --listen /ip4/0.0.0.0/tcp/31337 --identity boot.key [--swarm-key swarm.key]

Once it serves it prints one line to stdout, ``bootstrap at MULTIADDR...``: the addresses to give
to `run-node --initial-peers` and to the client. A persistent `--identity` keeps that address
the same across restarts. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ._cli import _leaf, _multiaddr, _one_line, _Parser, _positive_int, _seconds, _swarm_key

PROG = "lamina-bootstrap"


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a swarm's bootstrap peer and relay (no model). Prints one line "
                "'bootstrap at MULTIADDR...' once serving; SIGTERM/SIGINT stops it.")
    p.add_argument("--listen", nargs="+", action="extend", type=_multiaddr(peer=False), metavar="MULTIADDR",
                   help="addresses to listen on (default: /ip4/0.0.0.0/tcp/31337)")
    p.add_argument("--announce-addr", nargs="+", action="extend", type=_multiaddr(peer=False), default=[],
                   metavar="MULTIADDR", help="addresses to announce instead (public IP, port forwarding)")
    p.add_argument("--initial-peers", nargs="+", action="extend", type=_multiaddr(peer=True), default=[],
                   metavar="MULTIADDR", help="other bootstrap peers of the same swarm (optional)")
    p.add_argument("--identity", metavar="FILE",
                   help="private key file, created if missing: the peer id (and so the address) survives restarts")
    p.add_argument("--swarm-key", metavar="FILE",
                   help="a private swarm's key file (lamina-swarm-key); default: $LAMINA_SWARM_KEY, else open")
    p.add_argument("--no-relay", action="store_true", help="do not relay for peers behind NATs")
    p.add_argument("--relay-slots", type=_positive_int, default=128, metavar="N",
                   help="relay reservations held for peers behind NATs (default: 128)")
    p.add_argument("--relay-duration", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="longest life of one relayed connection; 0: no cap (default: 3600)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


async def serve(args: argparse.Namespace, key, *, task_status) -> None:  # type: ignore[no-untyped-def]
    import trio

    import p2p
    from pipeline._swarm import SwarmView, swarm_topics

    identity = p2p.Identity.load_or_create(args.identity) if args.identity else p2p.Identity.generate()
    nat = p2p.NatConfig(enabled=False, relay=not args.no_relay, reachability="direct",
                        relay_limits=p2p.RelayLimits(max_reservations=args.relay_slots,
                                                     circuit_duration=int(args.relay_duration)))
    config = p2p.HostConfig(identity=identity, listen_addrs=args.listen or ["/ip4/0.0.0.0/tcp/31337"],
                            announce_addrs=args.announce_addr, bootstrap_peers=args.initial_peers,
                            dht_mode="server", gossip_topics=swarm_topics(), swarm_key=key, nat=nat)
    async with p2p.open_host(config) as host, trio.open_nursery() as nursery:
        view = SwarmView(host)
        await nursery.start(view.serve)
        logging.getLogger("lamina.node").info("bootstrap %s%s serving", host.peer_id_str,
                                              " (relay on)" if nat.relay else "")
        task_status.started(host)
        await trio.sleep_forever()


async def _run(args: argparse.Namespace, key) -> None:  # type: ignore[no-untyped-def]
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            host = await nursery.start(serve, args, key)
            print(f"bootstrap at {' '.join(host.addrs())}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        key = _swarm_key(args.swarm_key)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    import trio

    from p2p import P2PError

    try:
        trio.run(_run, args, key)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # noqa: BLE001 - one clear line for expected failures
        leaf = _leaf(exc)
        if isinstance(leaf, (P2PError, ValueError, OSError)):   # the port is taken, an address is not ours
            print(f"{PROG}: error: {_one_line(leaf)}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
