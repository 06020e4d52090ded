#!/usr/bin/env python3
"""Where a swarm token's time goes, call by call: a timeline of one decode step in the client and
in each node of a 2-node loopback swarm.

    python scripts/bench_hops.py [--config tiny] [--new-tokens 400]

Every process (the client and each `run-node`) records the monotonic time at the entry and exit
of the functions a step goes through (`TRACED`: reading and writing a lane, decoding and
encoding frames, the node's step, its pass and its conversions, the client's step, head and
sampling). The nodes get the recorder through a `sitecustomize` module this script puts first on
their PYTHONPATH; nothing in lamina changes. For each process the steps of one generation (after
a warm-up) are cut into windows (the client: one `Chain.step` to the next; a node: from the lane
read that brings a step to the end of `run_step`); the windows with the most common sequence of
calls are kept and each call's time from the window's start is the median over them.

Prints JSON: decode ms per token, and per process the timeline: one line per entry (">") and
exit ("<"), microseconds from the window's start, nested calls indented. The recorder costs
about a microsecond per call. On this machine most of a step's time outside the pass is the
first touch of code after a sleep (see docs/benchmarks.md, "Cold costs of a hop").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _splits import SPLITS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# module -> (class or "", function) pairs to time
TRACED = {
    "p2p._lane": [("LaneStream", "read_nowait"), ("LaneStream", "write_nowait"), ("LaneStream", "seal")],
    "p2p._session": [("Session", "send"), ("Session", "_take_in_pending")],
    "p2p._protocol": [("SessionProtocol", "send"), ("SessionProtocol", "receive_data")],
    "node._server": [("SpanServer", "run_step"), ("SpanServer", "_compute"), ("SpanServer", "_deliver"),
                     ("SpanServer", "to_client"), ("_Pusher", "send_now")],
    "node._sessions": [("ServedSession", "accept"), ("ServedSession", "to_wire")],
    "node._batching": [("Batcher", "run"), ("Batcher", "_run_inline")],
    "pipeline._model": [("ClientHead", "logits"), ("ClientHead", "embed")],
    "pipeline._chain": [("Chain", "step"), ("Chain", "_read_final"), ("Chain", "_on_message"),
                        ("Chain", "_send_step")],
    "pipeline._generation": [("", "next_tokens")],
}

# The recorder, as a module (`_lamina_trace`): this process installs it itself; the nodes get it
# from a `sitecustomize` that imports it at start-up (LAMINA_TRACE_ROLE set).
RECORDER = textwrap.dedent('''
    import atexit, importlib.abc, importlib.machinery, inspect, json, os, sys, time

    TRACED = json.loads(os.environ["LAMINA_TRACE_TARGETS"])
    OUT = os.environ["LAMINA_TRACE_DIR"]
    EVENTS = []
    PATCHED = []
    _ns = time.perf_counter_ns

    def _wrap(owner, name, label):
        fn = getattr(owner, name)
        record = EVENTS.append
        if inspect.iscoroutinefunction(fn):
            async def timed(*args, **kwargs):
                record((_ns(), ">", label))
                try:
                    return await fn(*args, **kwargs)
                finally:
                    record((_ns(), "<", label))
        else:
            def timed(*args, **kwargs):
                record((_ns(), ">", label))
                try:
                    return fn(*args, **kwargs)
                finally:
                    record((_ns(), "<", label))
        setattr(owner, name, timed)

    def patch(module):
        for cls, name in TRACED.get(module.__name__, ()):
            owner = getattr(module, cls) if cls else module
            _wrap(owner, name, f"{cls}.{name}" if cls else name)
            PATCHED.append(f"{module.__name__}:{cls}.{name}")

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner):
            self.inner = inner
        def create_module(self, spec):
            return self.inner.create_module(spec)
        def exec_module(self, module):
            self.inner.exec_module(module)
            patch(module)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in TRACED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    def dump(role):
        with open(os.path.join(OUT, f"{role}-{os.getpid()}.json"), "w") as f:
            json.dump({"patched": PATCHED, "events": EVENTS}, f)

    def install():
        sys.meta_path.insert(0, _Finder())

    if os.environ.get("LAMINA_TRACE_ROLE"):
        install()
        atexit.register(dump, os.environ["LAMINA_TRACE_ROLE"])
''')


def timeline(events: list, anchor: str, node: bool, skip: int) -> tuple[list, int, int]:
    """The median timeline of the most common step window (see the module docstring)."""
    starts = [i for i, (_, kind, name) in enumerate(events) if name == anchor and kind == ">"]
    windows = []
    for a, b in zip(starts, starts[1:]):
        if node:
            first = a
            while first > 0 and not (events[first][2] == "LaneStream.read_nowait" and events[first][1] == ">"):
                first -= 1
            last = a
            while not (events[last][2] == anchor and events[last][1] == "<"):
                last += 1
            windows.append(events[first:last + 1])
        else:
            windows.append(events[a:b])
    windows = windows[skip:]
    shapes = collections.Counter(tuple((k, n) for _, k, n in w) for w in windows)
    (shape, count), = shapes.most_common(1)
    kept = [w for w in windows if tuple((k, n) for _, k, n in w) == shape]
    rows, depth = [], 0
    for j, (kind, name) in enumerate(shape):
        at = statistics.median(w[j][0] - w[0][0] for w in kept) / 1e3
        depth -= kind == "<"
        rows.append(f"{at:9.1f} {'  ' * depth}{kind} {name}")
        depth += kind == ">"
    return rows, count, len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(SPLITS))
    ap.add_argument("--new-tokens", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir, site = Path(tmp) / "trace", Path(tmp) / "site"
        trace_dir.mkdir()
        site.mkdir()
        (site / "_lamina_trace.py").write_text(RECORDER)
        (site / "sitecustomize.py").write_text("import _lamina_trace\n")
        os.environ["LAMINA_TRACE_TARGETS"] = json.dumps(TRACED)
        os.environ["LAMINA_TRACE_DIR"] = str(trace_dir)
        sys.path.insert(0, str(site))
        import _lamina_trace as recorder
        recorder.install()                        # before lamina's modules are imported
        os.environ["LAMINA_TRACE_ROLE"] = "node"  # the nodes install it at start-up
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))

        import torch
        from pipeline import DistributedModelForCausalLM
        from pipeline.launch import LocalSwarm
        from pipeline.tiny import write_tiny_model

        torch.set_num_threads(1)
        path = write_tiny_model(Path(tmp) / args.config, args.config)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        with LocalSwarm(path, SPLITS[args.config][2], threads=1) as swarm, \
                DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            model.generate(prompt, max_new_tokens=20, eos_token_id=[])  # warm-up: its steps come first
            warm_client = sum(1 for _, k, n in recorder.EVENTS if n == "Chain.step" and k == ">")
            began = time.perf_counter()
            model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
            wall = time.perf_counter() - began
            node_pids = [n.proc.pid for n in swarm.nodes]
        recorder.dump("client")
        runs = {}
        for f in trace_dir.glob("*.json"):
            role, pid = f.stem.split("-")
            runs[role if role == "client" else f"node{node_pids.index(int(pid))}"] = json.loads(f.read_text())
    missing = sorted({f"{m}:{c}.{n}" for m, pairs in TRACED.items() for c, n in pairs}
                     - set().union(*(set(r["patched"]) for r in runs.values())))
    out = {"config": args.config, "new_tokens": args.new_tokens,
           "spans": ",".join(f"{a}:{b}" for a, b in SPLITS[args.config][2]),
           "decode_ms_per_token": round(wall / args.new_tokens * 1e3, 2), "not_traced": missing}
    for role in sorted(runs):
        node = role != "client"
        # skip the warm-up generation's steps (a node runs as many steps as the client) and
        # the new generation's prefill
        rows, kept, total = timeline(runs[role]["events"], "SpanServer.run_step" if node else "Chain.step",
                                     node, warm_client + 1)
        out[role] = {"windows_kept": f"{kept}/{total}", "timeline_us": rows}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
