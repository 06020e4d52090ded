"""A lamina client run inside a lab namespace (tests/test_nat.py): it cannot run in the test's
own process, which lives in the root namespace.

    python tests/_lab_client.py MODEL BOOTSTRAP_ADDR --prompt 1,2,3 --new 16 [--swarm-key F]
        [--pause-after K] [--blocked PEER ...] [--route PEER ...]

Prints JSON lines on stdout: {"event": "ready"} once the swarm covers the model; with
--pause-after K, {"event": "paused", "tokens": K} after K new tokens, then it waits for a line on
stdin before going on; finally {"event": "done", "tokens": [...], "route": [...],
"conns": {peer: ["direct" | "relayed", ...]}, "failovers": N, "reopened": N}. An error is
{"event": "error", "type": ..., "message": ...} and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


class PauseAfter:
    """A streamer that stops the generation after `k` new tokens until stdin says go."""

    def __init__(self, k: int) -> None:
        self.k, self.seen, self.first = k, 0, True
        self.via = None   # set to a callable: what to report when paused

    def put(self, value) -> None:
        if self.first:          # the prompt
            self.first = False
            return
        self.seen += value.numel()
        if self.seen == self.k:
            say(event="paused", tokens=self.seen, via=self.via() if self.via else {})
            sys.stdin.readline()

    def end(self) -> None:
        pass


def relays_used(host, peer_id: str) -> list[str]:
    """The relays our connections to `peer_id` go through."""
    from libp2p.peer.id import ID

    out = []
    for conn in host.libp2p.get_network().get_connections(ID.from_base58(peer_id)):
        for addr in conn.get_transport_addresses():
            text = str(addr)
            if "/p2p-circuit" in text:
                out.append(text.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1])
    return out


def connection_kinds(host, peer_id: str) -> list[str]:
    from libp2p.peer.id import ID

    from p2p import is_relayed

    conns = host.libp2p.get_network().get_connections(ID.from_base58(peer_id))
    return ["relayed" if is_relayed(c) else "direct" for c in conns]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("bootstrap")
    p.add_argument("--prompt", required=True)
    p.add_argument("--new", type=int, required=True)
    p.add_argument("--swarm-key")
    p.add_argument("--pause-after", type=int)
    p.add_argument("--blocked", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lamina").setLevel(logging.DEBUG)
    from crdt import peer_id_from_str
    from pipeline import DistributedModelForCausalLM

    prompt = torch.tensor([[int(t) for t in args.prompt.split(",")]])
    try:
        with DistributedModelForCausalLM.from_pretrained(
                args.model, initial_peers=[args.bootstrap], swarm_key=args.swarm_key,
                blocked_servers=args.blocked, connect_timeout=60) as model:
            say(event="ready")
            streamer = PauseAfter(args.pause_after) if args.pause_after else None
            with model.inference_session(max_length=prompt.shape[1] + args.new) as session:
                if streamer is not None:
                    host = model._model.host
                    streamer.via = lambda: {hop.peer_id: relays_used(host, hop.peer_id) for hop in session.route}
                out = model.generate(prompt, max_new_tokens=args.new, eos_token_id=[], session=session,
                                     streamer=streamer)
                route = [hop.peer_id for hop in session.route]
                host = model._model.host
                say(event="done", tokens=out[0, prompt.shape[1]:].tolist(), route=route,
                    conns={peer: connection_kinds(host, peer) for peer in route},
                    client_relayed=any(link.relay for link in session.chain.links),
                    rtts=dict(session.chain.config.route_options.client_rtts_ms),
                    failovers=session.chain.failovers, reopened=session.chain.reopened,
                    addrs={peer: list(r.record.addrs) for peer in route
                           if (r := model._model.view.state.get(peer_id_from_str(peer))) is not None})
    except Exception as exc:
        say(event="error", type=type(exc).__name__, message=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
