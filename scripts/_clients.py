"""The benchmarks' concurrent clients: each its own process, with its own libp2p identity,
connections and event loop, as real clients are, optionally inside a lab host's network
namespace (scripts/_wanlab.py).

    ctx = client_context()
    clients: list[Client] = []
    try:
        ready_s = start_clients(ctx, [ClientSpec(model, peer, prompt, 64, 1, "c0.log"), ...], 2, clients)
        reports = run_round(clients)            # every client generates once, all at the same time
    finally:
        close_clients(clients)

Each client is forked by a multiprocessing fork server that has imported torch, lamina and
py-libp2p once (this module, preloaded). A fresh interpreter per client spends about 5 s of CPU
importing them (measured here: 2.1 s for torch, 1.5 s for lamina's client with py-libp2p, 1.7 s
for torch._dynamo and sympy, see `_preload`): 16 clients cost a minute of this 2-core machine
before any token, and starved the nodes meanwhile. A forked client needs 0.4-0.7 s of CPU to
open and warm up, and still creates everything it owns itself: identity, host, connections,
trio thread. A client for
a lab host joins the host's network namespace (`setns`) first, before it opens any socket or
starts any thread.

A client: loads the client head, warms its connections with a 4-token generation, reports
ready, then runs one `generate` of `new_tokens` greedy tokens per "go" (a new session each time,
so the session's opening is in the time to first token) and reports the token times (from the
one monotonic clock every process of this machine shares), its tokens, and its CPU seconds.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _clock import TokenClock  # noqa: E402

CLONE_NEWNET = 0x40000000
WARM_UP_TOKENS = 4
READY_TIMEOUT = 300.0     # seconds for every client to start, load its head and warm up
ROUND_TIMEOUT = 300.0     # seconds for every client to finish one round


def _preload() -> None:
    """Import what a client imports lazily (py-libp2p through `p2p`, the client, the chain), so
    that the fork server holds it and each forked client skips it. A forked client also runs
    the calling script's top level again (multiprocessing's `__main__` fix-up): what it imports
    is here too."""
    import p2p

    for name in p2p.__all__:
        try:
            getattr(p2p, name)
        except (ImportError, AttributeError):
            pass
    # torch._dynamo (and sympy, 800 modules, about 1.7 s of CPU): the client head is built on the
    # meta device, and nn.Embedding's init there (normal_) goes through torch._refs, which
    # imports it
    for module in ("pipeline._client", "pipeline._chain", "pipeline._embedded", "pipeline._gguf", "tokenizers",
                   "torch._dynamo", "pipeline.launch", "pipeline.tiny", "_splits"):   # and what bench_swarm imports
        try:
            __import__(module)
        except ImportError:
            pass


_preload()


@dataclass(frozen=True)
class ClientSpec:
    checkpoint: str
    peer: str                   # the multiaddr of a node to join the swarm through
    prompt: list[int]
    new_tokens: int
    threads: int                # torch intra-op threads
    log: str                    # the client's stderr (its warnings, a traceback)
    netns: str | None = None    # a lab host's network namespace to run in


def client_context():
    """The multiprocessing context that forks clients, its fork server started (with this module
    imported: `_preload`)."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_clients"])
    # Python 3.11's fork server ignores the sys.path it is handed (and never finds a script's
    # "__main__" to preload): it finds this module through PYTHONPATH, set while it starts only
    # (the nodes, started later, get the environment as it was).
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), *([old] if old else [])])
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the network namespace `ip netns` calls `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _client_main(conn, spec: ClientSpec) -> None:
    """The forked client (see the module's doc)."""
    log = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)            # the bench's stdout is its JSON: nothing of a client's goes there
    os.dup2(log, 2)
    os.close(log)
    try:
        if spec.netns:
            _enter_netns(spec.netns)
        from pipeline import DistributedModelForCausalLM

        torch.set_num_threads(spec.threads)
        prompt = torch.tensor([spec.prompt])
        began = time.perf_counter()
        with DistributedModelForCausalLM.from_pretrained(spec.checkpoint, initial_peers=[spec.peer]) as model:
            opened = time.perf_counter()
            model.generate(prompt, max_new_tokens=WARM_UP_TOKENS, eos_token_id=[])
            conn.send({"ready": os.getpid(), "open_s": opened - began, "warm_up_s": time.perf_counter() - opened,
                       "cpu_s": _cpu_seconds()})
            while conn.recv() == "go":
                cpu = _cpu_seconds()
                clock = TokenClock()
                try:
                    out = model.generate(prompt, max_new_tokens=spec.new_tokens, eos_token_id=[], streamer=clock)
                except Exception as exc:  # reported: the bench says which client failed and why
                    traceback.print_exc()
                    conn.send({"error": f"{type(exc).__name__}: {exc}"})
                    continue
                conn.send({"t0": clock.t0, "times": clock.times, "cpu_s": _cpu_seconds() - cpu,
                           "tokens": out[0, prompt.shape[1]:].tolist()})
    except BaseException as exc:
        traceback.print_exc()
        try:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass


class Client:
    def __init__(self, ctx, spec: ClientSpec) -> None:
        self.spec = spec
        self.ready: dict = {}           # its ready message: pid, seconds to open and to warm up, CPU seconds
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()

    def receive(self, timeout: float) -> dict:
        """The client's next message; RuntimeError (with its log's tail) if it sends none in
        `timeout` s or dies first."""
        try:
            if self.conn.poll(max(0.0, timeout)):
                return self.conn.recv()
            why = f"sent nothing in {timeout:.0f} s"
        except (EOFError, OSError):
            why = f"exited ({self.proc.exitcode})"
        tail = Path(self.spec.log).read_text(errors="replace")[-3000:] if Path(self.spec.log).exists() else ""
        raise RuntimeError(f"client {self.proc.pid} {why}; its log {self.spec.log}:\n{tail}")

    def stop(self) -> None:
        """Tell it to stop: it closes its host and exits (a killed client would leave its
        sessions open on the nodes until their idle timeout, and a node's drain would wait for
        them)."""
        try:
            self.conn.send("stop")
        except OSError:
            pass

    def join(self, deadline: float) -> None:
        """Wait for it to exit until `deadline` (time.monotonic()), then kill it."""
        self.proc.join(max(0.1, deadline - time.monotonic()))
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def start_clients(ctx, specs: list[ClientSpec], parallel: int, clients: list[Client]) -> float:
    """Start a client per spec into `clients`, at most `parallel` of them starting (loading,
    warming up) at once; returns the seconds until all were ready. All at once (16 clients
    warming up on this 2-core machine) starved the nodes of CPU: they missed their heartbeats
    and push deadlines and clients gave up on them."""
    began = time.perf_counter()
    deadline = time.monotonic() + READY_TIMEOUT
    starting: list[Client] = []
    while len(clients) < len(specs) or starting:
        while len(clients) < len(specs) and len(starting) < parallel:
            clients.append(Client(ctx, specs[len(clients)]))
            starting.append(clients[-1])
        client = starting.pop(0)
        client.ready = client.receive(deadline - time.monotonic())
        if "ready" not in client.ready:
            raise RuntimeError(f"a client did not start: {client.ready}")
    return time.perf_counter() - began


def run_round(clients: list[Client]) -> list[dict]:
    """Every client generates once, all told to go at the same time; their reports."""
    for client in clients:
        client.conn.send("go")
    deadline = time.monotonic() + ROUND_TIMEOUT
    return [client.receive(deadline - time.monotonic()) for client in clients]


def close_clients(clients: list[Client]) -> None:
    for client in clients:
        client.stop()
    deadline = time.monotonic() + 60
    for client in clients:
        client.join(deadline)
