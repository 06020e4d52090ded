#!/usr/bin/env python3
"""How close the swarm gets to the physical bound of a split decode on this machine.

    python scripts/bench_bound.py [--config tiny] [--rounds 20] [--new-tokens 64] [--sides ...]

The sets of processes (five by default) decode the same prompt greedily, one generation each
in turn, round after round (a shared VM's speed drifts by tens of percent within minutes; turns
this short put every side under the same drift):

* ``local``: the whole model in one process (`LocalModelForCausalLM`);
* ``bound``: the 2-node split of the swarm benchmark as bare processes: a client with the
  embeddings and LM head, and one process per span, joined by loopback TCP, each blocking in
  ``recv``. No framing, encryption, validation, event loop, echo, heartbeats or failover
  bookkeeping: only the compute, the split and three hops per token. Nothing that runs the
  model this way on this machine can be faster, so it is the bound a swarm is measured against;
* ``swarm``: real ``run-node`` processes and the client library (`DistributedModelForCausalLM`).

Variants of the bound say where the swarm's extra time is not:

* ``bound_trio``: the span processes wait for their input in trio (``wait_readable`` on a
  non-blocking socket, as lamina's nodes do) instead of blocking in ``recv``: the event loop's
  cost on each wake-up;
* ``bound_lean``: every hop carries what a lamina message carries, in the leanest Python: a
  ChaCha20-Poly1305 record (as lanes seal them) holding a msgpack header and the hidden
  states, decrypted, parsed and checked on arrival: the cost of encryption and framing alone;
* ``bound_spin`` (only with ``--sides``): the bound, but each receiving process (span or client)
  polls its socket in a short window around the arrival it predicts from the last ones, instead
  of sleeping until the kernel wakes it: whether the wake-ups of three hops per token could be
  bought back with CPU time.

Every process runs torch with one intra-op thread. Prints JSON: decode ms per token (the median
over rounds) and tokens/s for each side, the per-round ratios to local (medians), the share of
the bound's speed each other side reaches, and whether all sides produced the same tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from _clock import TokenClock
from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("local", "bound", "bound_trio", "bound_lean", "swarm")
ALL_SIDES = SIDES + ("bound_spin",)
SPIN_LEAD = 0.001  # bound_spin: start polling this long before the predicted arrival
SPIN_TAIL = 0.001  # ... and give up (and sleep) this long after it
_HEADER = struct.Struct("<II")  # position, tokens
_LENGTH = struct.Struct("<I")


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("peer closed")
        got += k
    return buf


class _ArrivalPoller:
    """``bound_spin``'s wait for the next message on `sock`: sleep (in ``select``, so an early
    message still wakes us) until SPIN_LEAD before the arrival predicted from the median of the
    last gaps between arrivals, poll the socket until SPIN_TAIL after it, then sleep."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.last: float | None = None
        self.gaps: collections.deque[float] = collections.deque(maxlen=8)

    def wait(self) -> None:
        if self.last is not None and len(self.gaps) >= 3:
            predicted = self.last + statistics.median(self.gaps)
            now = time.perf_counter()
            if predicted - SPIN_LEAD > now:
                select.select([self.sock], [], [], predicted - SPIN_LEAD - now)
            while time.perf_counter() < predicted + SPIN_TAIL:
                if select.select([self.sock], [], [], 0)[0]:
                    break
        select.select([self.sock], [], [])
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _accept(listener: socket.socket) -> socket.socket:
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener


class _Lean:
    """One direction of a hop in ``bound_lean``: records as a lane seals them (a 4-byte length,
    ChaCha20-Poly1305 with a counter nonce) holding a 4-byte header length, a msgpack header and
    the hidden states."""

    def __init__(self) -> None:
        self._aead = ChaCha20Poly1305(bytes(32))  # a benchmark: the key does not matter
        self._counter = 0

    def _nonce(self) -> bytes:
        self._counter += 1
        return b"\0\0\0\0" + self._counter.to_bytes(8, "little")

    def seal(self, header: dict, payload: bytes) -> bytes:
        head = msgpack.packb(header)
        sealed = self._aead.encrypt(self._nonce(), _LENGTH.pack(len(head)) + head + payload, None)
        return _LENGTH.pack(len(sealed)) + sealed

    def open(self, sock: socket.socket) -> tuple[dict, memoryview]:
        (size,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
        # (into a bytearray, as lamina's frame decoder copies a record into the frame's body)
        plain = memoryview(bytearray(self._aead.decrypt(self._nonce(), bytes(_recv_exactly(sock, size)), None)))
        (head_len,) = _LENGTH.unpack_from(plain, 0)
        header = msgpack.unpackb(plain[4:4 + head_len], raw=False)
        if not (type(header) is dict and type(header.get("position")) is int
                and type(header.get("tokens")) is int and type(header.get("step")) is int):
            raise ValueError("bad header")
        return header, plain[4 + head_len:]


# -- the roles (each runs in its own process) --------------------------------------------------
def role_node(path: str, start: int, end: int, next_port: int, mode: str) -> None:
    """One span: read (position, tokens, hidden) from upstream, run the blocks, send on;
    `mode` is "bound", "bound_trio", "bound_lean" or "bound_spin" (see the module docstring)."""
    import torch

    from pipeline import Segment
    from pipeline._checkpoint import Checkpoint, load_span

    torch.set_num_threads(1)
    checkpoint = Checkpoint(path)
    span = load_span(checkpoint, start, end, "cpu", "auto")
    dim = checkpoint.config.hidden_size
    listener = _listener()
    print(listener.getsockname()[1], flush=True)
    downstream = _connect(next_port)
    upstream = _accept(listener)
    cache = span.new_cache(1, 4096)

    def run(hidden, position: int, tokens: int) -> bytes:
        out = span.forward_segments([Segment(hidden.view(1, tokens, dim), position, cache)])[0]
        return out.contiguous().numpy().tobytes()

    if mode == "bound_trio":
        import trio

        async def serve() -> None:
            upstream.setblocking(False)

            async def read(n: int) -> bytearray:
                buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:
                    try:
                        k = upstream.recv_into(view[got:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(upstream)
                        continue
                    if not k:
                        raise EOFError("peer closed")
                    got += k
                return buf

            while True:
                try:
                    position, tokens = _HEADER.unpack(await read(_HEADER.size))
                    hidden = torch.frombuffer(await read(tokens * dim * 4), dtype=torch.float32)
                except EOFError:
                    return
                downstream.sendall(_HEADER.pack(position, tokens) + run(hidden, position, tokens))

        return trio.run(serve)
    inbound, outbound = _Lean(), _Lean()
    poller = _ArrivalPoller(upstream)
    while True:
        try:
            if mode == "bound_lean":
                header, payload = inbound.open(upstream)
                position, tokens = header["position"], header["tokens"]
                if len(payload) != tokens * dim * 4:
                    raise ValueError("hidden states of the wrong size")
                hidden = torch.frombuffer(payload, dtype=torch.float32)
            else:
                if mode == "bound_spin":
                    poller.wait()
                position, tokens = _HEADER.unpack(_recv_exactly(upstream, _HEADER.size))
                hidden = torch.frombuffer(_recv_exactly(upstream, tokens * dim * 4), dtype=torch.float32)
        except EOFError:
            return
        out = run(hidden, position, tokens)
        if mode == "bound_lean":
            downstream.sendall(outbound.seal(header, out))
        else:
            downstream.sendall(_HEADER.pack(position, tokens) + out)


def role_generator(kind: str, path: str, spans: str, new_tokens: int) -> None:
    """Answer "gen" lines on stdin with one generation's ms/token and tokens (JSON)."""
    import torch

    torch.set_num_threads(1)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    cleanup = []
    if kind == "local":
        from pipeline import LocalModelForCausalLM

        generate = LocalModelForCausalLM.from_pretrained(path).generate
    elif kind == "swarm":
        from pipeline import DistributedModelForCausalLM
        from pipeline.launch import LocalSwarm

        swarm = LocalSwarm(path, [tuple(map(int, s.split(":"))) for s in spans.split(",")], threads=1)
        swarm.start()
        model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        generate = model.generate
        cleanup = [model.close, swarm.stop]
    else:
        generate, cleanup = _bound_generator(path, spans, kind)
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "gen":
                break
            clock = TokenClock()
            out = generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
            print(json.dumps({"ms": clock.ms_per_token(), "tokens": out[0].tolist()}), flush=True)
    finally:
        for fn in cleanup:
            fn()


def _bound_generator(path: str, spans: str, mode: str):
    """The bound's client: the head here, the spans in `role_node` processes."""
    from pipeline._checkpoint import Checkpoint, load_client_head
    from pipeline._generation import GenerationConfig, generate

    import torch

    checkpoint = Checkpoint(path)
    head = load_client_head(checkpoint, "cpu", "auto")
    dim = checkpoint.config.hidden_size
    listener = _listener()
    port, nodes = listener.getsockname()[1], []
    for span in reversed(spans.split(",")):  # last span first: each connects to the next
        start, end = span.split(":")
        proc = subprocess.Popen([sys.executable, __file__, "--role", "node", "--path", path,
                                 "--span", f"{start}:{end}", "--next-port", str(port), "--mode", mode],
                                stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline())
        nodes.append(proc)
    first = _connect(port)
    last = _accept(listener)

    outbound, inbound, steps = _Lean(), _Lean(), [0]
    poller = _ArrivalPoller(last)

    def step(hidden: torch.Tensor, position: int) -> torch.Tensor:
        tokens = hidden.shape[1]
        data = hidden.contiguous().numpy().tobytes()
        if mode == "bound_lean":
            steps[0] += 1
            first.sendall(outbound.seal({"session": "0" * 32, "step": steps[0], "position": position,
                                         "tokens": tokens}, data))
            header, payload = inbound.open(last)
            if header["step"] != steps[0] or len(payload) != tokens * dim * 4:
                raise ValueError("a result that does not answer this step")
            return torch.frombuffer(payload, dtype=torch.float32).view(1, tokens, dim)
        first.sendall(_HEADER.pack(position, tokens) + data)
        if mode == "bound_spin":
            poller.wait()
        _recv_exactly(last, _HEADER.size)
        return torch.frombuffer(_recv_exactly(last, tokens * dim * 4), dtype=torch.float32).view(1, tokens, dim)

    def run(prompt, max_new_tokens, eos_token_id, streamer):
        cfg = GenerationConfig.build((), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        return generate(step, head, prompt, cfg, streamer)

    def stop() -> None:
        first.close()
        for proc in nodes:
            proc.wait(timeout=30)

    return run, [stop]


# -- the orchestrator ----------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(SPLITS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated sides to run, local and bound always included (of {', '.join(ALL_SIDES)})")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--span", help=argparse.SUPPRESS)
    ap.add_argument("--next-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--spans", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "node":
        start, end = map(int, args.span.split(":"))
        return role_node(args.path, start, end, args.next_port, args.mode)
    if args.role:
        return role_generator(args.role, args.path, args.spans, args.new_tokens)

    from pipeline.tiny import write_tiny_model

    chosen = ["local", "bound"] + [k for k in args.sides.split(",") if k not in ("local", "bound")]
    unknown = [k for k in chosen if k not in ALL_SIDES]
    if unknown:
        ap.error(f"unknown sides {unknown}; choose from {', '.join(ALL_SIDES)}")
    spans = ",".join(f"{a}:{b}" for a, b in SPLITS[args.config][2])
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny_model(Path(tmp) / args.config, args.config))
        sides = {}
        for kind in chosen:
            sides[kind] = subprocess.Popen(
                [sys.executable, __file__, "--role", kind, "--path", path, "--spans", spans,
                 "--new-tokens", str(args.new_tokens)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if sides[kind].stdout.readline().strip() != "ready":
                raise SystemExit(f"{kind} did not start")
        ms: dict[str, list[float]] = {k: [] for k in sides}
        tokens: dict[str, list[int]] = {}
        try:
            for rnd in range(args.rounds + 1):  # round 0 warms every side up
                for kind, proc in sides.items():
                    proc.stdin.write("gen\n")
                    proc.stdin.flush()
                    reply = json.loads(proc.stdout.readline())
                    if rnd:
                        ms[kind].append(reply["ms"])
                    tokens[kind] = reply["tokens"]
        finally:
            for proc in sides.values():
                proc.stdin.close()
            for proc in sides.values():
                proc.wait(timeout=60)

    def paired(base: str, kind: str) -> float:  # per round: base ms / kind ms, then the median
        return round(statistics.median(a / b for a, b in zip(ms[base], ms[kind])), 3)

    med = {k: statistics.median(v) for k, v in ms.items()}
    print(json.dumps({
        "config": args.config, "rounds": args.rounds, "new_tokens": args.new_tokens, "spans": spans,
        "ms_per_token": {k: round(v, 2) for k, v in med.items()},
        "decode_tok_s": {k: round(1e3 / v, 1) for k, v in med.items()},
        "ratio_vs_local": {k: paired("local", k) for k in chosen if k != "local"},
        "share_of_bound": {k: paired("bound", k) for k in chosen if k not in ("local", "bound")},
        "added_ms_over_bound": {k: round(med[k] - med["bound"], 2) for k in chosen if k not in ("local", "bound")},
        "tokens_equal": all(tokens[k] == tokens["local"] for k in chosen),
    }, indent=2))


if __name__ == "__main__":
    main()
