#!/usr/bin/env python3
"""Virtual-time gossip simulation of the swarm CRDT, running the real `crdt` code.

Every replica is a real `SwarmState`; every exchange is the real push-pull of `crdt.digest` /
`crdt.sync` / `SwarmState.merge`, with every record signed by a real Ed25519 key and verified
(once per process, as in a node) on first admission. Only the network is simulated.

Model
  * Round-based, synchronous: in each round every live node starts exchanges with `fanout`
    distinct random live peers. Messages are computed from the states at the start of the round
    and the received records are merged at its end (information moves at most one hop per
    exchange per round, the conservative choice). Each message is lost with probability `loss`;
    a lost message ends that exchange.
  * Each node has its own wall-clock offset (uniform in +-`skew_ms`) and its own `HybridClock`;
    merges validate against the receiver's local time.
  * Scenario `churn` (default): the swarm starts converged (a running swarm), then for
    `churn_rounds` rounds a fraction `churn` of the live nodes per round changes: half re-announce
    (lease renewal / new load), a quarter leave (half gracefully, with an OFFLINE record, then
    gossip `drain_rounds` more rounds; half crash silently), a quarter new nodes join with an empty
    state. Then the swarm is left quiet until every live replica holds the same state.
  * Scenario `cold`: every node starts knowing only its own record.
  * `--model async`: instead, exchanges run one after another in a random order and merge as
    they go (information can cross several hops in one round; fewer duplicate transfers).
  * `--wire`: every message is really encoded and decoded (slow; bytes are identical either way,
    since `crdt.wire_size` is exact; tests check that).

Output: one JSON object per run, with rounds to convergence (counted from the last churn round),
bytes sent per live node per round (mean, during churn, max over rounds), state size per node,
and wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crdt import (  # noqa: E402
    Digest,
    HybridClock,
    Load,
    ModelId,
    Reachability,
    ServerRecord,
    ServerState,
    SignedRecord,
    Signer,
    SwarmConfig,
    SwarmState,
    decode_message,
    decode_record,
    digest,
    encode_message,
    peer_id_to_str,
    sync,
    wire_size,
)

T0_MS = 1_760_000_000_000  # virtual epoch
MODELS = [
    (ModelId.from_config("meta-llama/Llama-3.1-70B-Instruct", {"num_hidden_layers": 80}), 80),
    (ModelId.from_config("mistralai/Mixtral-8x22B-v0.1", {"num_hidden_layers": 56}), 56),
    (ModelId.from_config("Qwen/Qwen2.5-72B-Instruct", {"num_hidden_layers": 80}), 80),
]


@dataclass
class Node:
    signer: Signer
    offset_ms: int
    clock: HybridClock
    model: int
    start: int
    end: int
    relayed: bool
    addrs: tuple[str, ...]
    state: SwarmState = field(default_factory=SwarmState)
    leave_round: int | None = None  # graceful leavers keep gossiping until this round
    inbox: list[SignedRecord] = field(default_factory=list)


class Sim:
    def __init__(self, args: argparse.Namespace, n: int) -> None:
        self.args = args
        self.n = n
        self.rng = random.Random(args.seed * 1_000_003 + n)
        self.config = SwarmConfig()
        self.nodes: list[Node] = []
        self.live: list[int] = []
        self.round = 0
        self.bytes_sent = 0
        self.messages = 0
        self.rejected = 0

    # ---- nodes and their records ------------------------------------------------------------

    def now(self) -> int:
        return T0_MS + self.round * self.args.round_ms

    def local(self, node: Node) -> int:
        return self.now() + node.offset_ms

    def new_node(self) -> int:
        rng = self.rng
        signer = Signer(rng.randbytes(32))
        model = rng.randrange(len(MODELS))
        num_blocks = MODELS[model][1]
        length = rng.randint(4, 24)
        start = rng.randrange(0, num_blocks - length + 1)
        relayed = rng.random() < 0.3
        ip = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        port = rng.randrange(1024, 65536)
        if relayed:
            relay = Signer(rng.randbytes(32)).peer_id
            addrs = (f"/ip4/198.51.100.{rng.randrange(1, 255)}/tcp/4001/p2p/{peer_id_to_str(relay)}/p2p-circuit",)
        else:
            addrs = (f"/ip4/{ip}/tcp/{port}", f"/ip4/{ip}/udp/{port}/quic-v1")
        node = Node(
            signer=signer,
            offset_ms=rng.randint(-self.args.skew_ms, self.args.skew_ms),
            clock=HybridClock(self.config.max_skew_ms),
            model=model,
            start=start,
            end=start + length,
            relayed=relayed,
            addrs=addrs,
            state=SwarmState(self.config),
        )
        self.nodes.append(node)
        return len(self.nodes) - 1

    def announce(self, idx: int, state: ServerState) -> SignedRecord:
        node = self.nodes[idx]
        rng = self.rng
        wall = self.local(node)
        own = node.state.get(node.signer.peer_id)
        if own is not None:  # never go back in time, even across restarts
            node.clock.update(own.hlc, wall)
        expires = wall + self.args.lease_ms
        if own is not None:  # leases never shrink, so an OFFLINE record shadows older ones
            expires = max(expires, own.record.expires_ms)
        peers = [self.nodes[self.rng.choice(self.live)].signer.peer_id for _ in range(3)] if self.live else []
        rec = ServerRecord(
            peer_id=node.signer.peer_id,
            model=MODELS[node.model][0],
            start=node.start,
            end=node.end,
            state=state,
            hlc=node.clock.now(wall),
            expires_ms=expires,
            throughput=round(rng.uniform(5, 200), 3),
            inference_rps=round(rng.uniform(50, 2000), 3),
            load=Load(rng.randrange(0, 32), rng.randrange(0, 1 << 20)),
            addrs=node.addrs,
            reachability=Reachability.RELAYED if node.relayed else Reachability.DIRECT,
            next_rtts={p: round(rng.uniform(1, 300), 2) for p in peers},
            version="lamina/0.1.0",
            public_name=f"volunteer-{idx}",
        )
        # Other replicas see the record as bytes from the network: a fresh, unverified object.
        received = decode_record(node.signer.sign(rec).wire)
        node.state = node.state.merge([received], now_ms=wall).state
        return received

    # ---- gossip ------------------------------------------------------------------------------

    def send(self, msg):
        """Account for one message; returns what the receiver gets, or None if it was lost."""
        self.messages += 1
        if self.args.wire:
            data = encode_message(msg)
            self.bytes_sent += len(data)
            out = decode_message(data)
        else:
            self.bytes_sent += wire_size(msg)
            out = msg
        if self.rng.random() < self.args.loss:
            return None
        return out

    def exchange(self, a: Node, b: Node, digests: dict[int, Digest], ia: int) -> None:
        sequential = self.args.model == "async"
        d = self.send(digest(a.state) if sequential else digests[ia])
        if d is None:
            return
        msg = sync(d, b.state)
        receiver, other = a, b
        while msg is not None:
            got = self.send(msg)
            if got is None:
                return
            if sequential:
                receiver.state = receiver.state.merge(got, now_ms=self.local(receiver)).state
            else:
                # Snapshot semantics: the receiver answers from its start-of-round state. The
                # records just received never change that answer (they fill scopes the reply does
                # not touch), and they are merged at the end of the round.
                receiver.inbox.extend(got.records)
            msg = sync(got, receiver.state)
            receiver, other = other, receiver

    def bootstrap(self, idx: int) -> None:
        """A joining node first syncs with one bootstrap peer (sequentially, merging as it goes),
        as a node does at start-up, instead of pulling the full state from every gossip partner
        of its first round."""
        node = self.nodes[idx]
        peer = self.nodes[self.rng.choice(self.live)]
        receiver, other = peer, node
        msg = sync(digest(node.state), peer.state)
        self.send(digest(node.state))
        while msg is not None:
            got = self.send(msg)
            if got is None:
                return
            receiver, other = other, receiver
            receiver.state = receiver.state.merge(got, now_ms=self.local(receiver)).state
            msg = sync(got, receiver.state)

    def step(self) -> None:
        args = self.args
        rng = self.rng
        digests = {i: digest(self.nodes[i].state) for i in self.live}
        order = self.live[:]
        rng.shuffle(order)
        k = min(args.fanout, len(self.live) - 1)
        for ia in order:
            a = self.nodes[ia]
            peers: set[int] = set()
            live = self.live
            while len(peers) < k:
                ib = live[rng.randrange(len(live))]
                if ib != ia:
                    peers.add(ib)
            for ib in sorted(peers):
                self.exchange(a, self.nodes[ib], digests, ia)
        for i in self.live:
            node = self.nodes[i]
            if node.inbox:
                result = node.state.merge(node.inbox, now_ms=self.local(node))
                node.state = result.state
                self.rejected += len(result.rejected)
                node.inbox = []

    def churn(self) -> dict[str, int]:
        rng = self.rng
        m = max(1, round(self.args.churn * len(self.live)))
        counts = {"update": 0, "leave": 0, "crash": 0, "join": 0}
        for _ in range(m):
            kind = rng.choices(["update", "leave", "crash", "join"], weights=[4, 1, 1, 2])[0]
            if kind == "join":
                idx = self.new_node()
                self.announce(idx, ServerState.ONLINE)
                self.bootstrap(idx)
                self.live.append(idx)
            else:
                candidates = [i for i in self.live if self.nodes[i].leave_round is None]
                idx = rng.choice(candidates)
                if kind == "update":
                    self.announce(idx, ServerState.ONLINE)
                elif kind == "leave":
                    self.announce(idx, ServerState.OFFLINE)
                    self.nodes[idx].leave_round = self.round + self.args.drain_rounds
                else:
                    self.live.remove(idx)
            counts[kind] += 1
        return counts

    def converged(self) -> bool:
        roots = {self.nodes[i].state.root for i in self.live}
        return len(roots) == 1

    def agreeing_fraction(self) -> float:
        counts: dict[bytes, int] = {}
        for i in self.live:
            r = self.nodes[i].state.root
            counts[r] = counts.get(r, 0) + 1
        return max(counts.values()) / len(self.live)

    # ---- scenarios ---------------------------------------------------------------------------

    def setup(self) -> None:
        for _ in range(self.n):
            self.live.append(self.new_node())
        records = [self.announce(i, ServerState.ONLINE) for i in self.live]
        if self.args.scenario == "churn":
            # A running swarm: everyone already agrees (one shared immutable state).
            full = SwarmState.of(records, now_ms=self.now(), config=self.config)
            for i in self.live:
                self.nodes[i].state = full

    def run(self) -> dict:
        args = self.args
        t0 = time.perf_counter()
        self.setup()
        t_setup = time.perf_counter() - t0
        churn_rounds = args.churn_rounds if args.scenario == "churn" else 0
        per_round = []
        churned = {"update": 0, "leave": 0, "crash": 0, "join": 0}
        converged_at = None
        while self.round < args.max_rounds:
            if self.round < churn_rounds:
                for k, v in self.churn().items():
                    churned[k] += v
            for i in [i for i in self.live if self.nodes[i].leave_round == self.round]:
                self.live.remove(i)
            sent0, msgs0 = self.bytes_sent, self.messages
            self.step()
            per_round.append(
                {
                    "round": self.round,
                    "live": len(self.live),
                    "bytes_per_node": round((self.bytes_sent - sent0) / len(self.live)),
                    "messages_per_node": round((self.messages - msgs0) / len(self.live), 2),
                    "agreeing": round(self.agreeing_fraction(), 4),
                }
            )
            self.round += 1
            if self.round >= churn_rounds and self.converged():
                converged_at = self.round
                break
        ref = self.nodes[self.live[0]].state
        total_rounds = len(per_round)
        return {
            "scenario": args.scenario,
            "model": args.model,
            "nodes": self.n,
            "fanout": args.fanout,
            "loss": args.loss,
            "churn_per_round": args.churn if churn_rounds else 0.0,
            "churn_rounds": churn_rounds,
            "churn_events": churned if churn_rounds else {},
            "seed": args.seed,
            "converged": converged_at is not None,
            "rounds_to_converge": (converged_at - max(churn_rounds - 1, 0)) if converged_at else None,
            "rounds_total": total_rounds,
            "bytes_per_node_per_round": round(self.bytes_sent / sum(r["live"] for r in per_round)),
            "bytes_per_node_per_round_max": max(r["bytes_per_node"] for r in per_round),
            "messages_per_node_per_round": round(self.messages / sum(r["live"] for r in per_round), 2),
            "state_records_per_node": len(ref),
            "state_bytes_per_node": ref.wire_size(),
            "rejected_records": self.rejected,
            "setup_s": round(t_setup, 2),
            "wall_s": round(time.perf_counter() - t0, 2),
            "per_round": per_round if args.per_round else None,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000],
                   help="comma-separated swarm sizes (default 1000,10000)")
    p.add_argument("--fanout", type=int, default=6)
    p.add_argument("--loss", type=float, default=0.01, help="probability each message is lost")
    p.add_argument("--churn", type=float, default=0.01, help="fraction of live nodes changing per churn round")
    p.add_argument("--churn-rounds", type=int, default=3)
    p.add_argument("--drain-rounds", type=int, default=2)
    p.add_argument("--scenario", choices=["churn", "cold"], default="churn")
    p.add_argument("--model", choices=["sync", "async"], default="sync",
                   help="sync: snapshot rounds, merge at round end (default); async: merge as you go")
    p.add_argument("--max-rounds", type=int, default=40)
    p.add_argument("--round-ms", type=int, default=1000)
    p.add_argument("--lease-ms", type=int, default=120_000)
    p.add_argument("--skew-ms", type=int, default=1000, help="node clock offsets are uniform in +-this")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--wire", action="store_true", help="really encode/decode every message")
    p.add_argument("--per-round", action="store_true", help="include per-round figures")
    args = p.parse_args(argv)
    for n in args.nodes:
        print(json.dumps(Sim(args, n).run()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
