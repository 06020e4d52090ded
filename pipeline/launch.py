"""Start a private swarm of real `run-node` processes on this machine.

    with LocalSwarm("path/to/model", spans=[(0, 3), (3, 6), (6, 8)]) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)

Each node is a separate `run-node` process; the first starts the swarm (`--new-swarm`), the
others join through it. With ``swarm_key=PATH`` every node gets ``--swarm-key PATH`` (a private
swarm: give the client the same ``swarm_key=``). Readiness is the node's own `serving blocks A:B <multiaddr>` line on
stdout, read with a deadline (no sleeps). Node logs go to files in `log_dir`. Leaving the block
sends SIGTERM (graceful drain) and waits for every process.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ._errors import LaminaError

READY = re.compile(r"serving blocks (\d+):(\d+).*?(/ip4/\S+/p2p/\S+)")


class NodeStartError(LaminaError, RuntimeError):
    pass


def run_node_command() -> list[str]:
    """This interpreter's `run-node` (beside it in its bin directory), never another one found
    on PATH: a different environment may hold another checkout's lamina."""
    exe = Path(sys.executable).parent / "run-node"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "node"]


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    start: int
    end: int
    addr: str
    log_path: Path

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def spawn_node(model: str | os.PathLike, args: Sequence[str], log_path: Path,
               env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start one `run-node` process (stdout piped for its ready line, stderr to `log_path`).
    `prefix` runs it under another command that execs it, e.g. ``ip netns exec NAME``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([*prefix, *run_node_command(), "--model", str(model), *args],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})


def wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> NodeProcess:
    """Wait for a spawned node's `serving blocks A:B <multiaddr>` line."""
    m = read_until(proc, READY, log_path, timeout, "run-node")
    return NodeProcess(proc, int(m.group(1)), int(m.group(2)), m.group(3), log_path)


def read_until(proc: subprocess.Popen, pattern: re.Pattern, log_path: Path, timeout: float,
               what: str) -> re.Match:
    """Read `proc`'s piped stdout until `pattern` matches it (its ready line); NodeStartError
    with the tail of `log_path` (its stderr) if it exits first or `timeout` s pass, and then
    `proc` is killed."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeStartError(f"{what} did not report serving within {timeout:.0f} s; "
                                     f"log: {log_path}")
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=10)
                raise NodeStartError(f"{what} exited ({proc.returncode}) before serving:\n"
                                     + log_path.read_text(errors="replace")[-3000:])
            buf += chunk
            m = pattern.search(buf.decode(errors="replace"))
            if m:
                return m
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        sel.close()


def start_node(model: str | os.PathLike, args: Sequence[str], log_path: Path,
               timeout: float = 120.0, env: dict[str, str] | None = None,
               prefix: Sequence[str] = ()) -> NodeProcess:
    """Start one `run-node` and wait until it serves."""
    return wait_ready(spawn_node(model, args, log_path, env, prefix), log_path, timeout)


class LocalSwarm:
    """A swarm of `run-node` processes serving `spans` of `model` (see module docstring)."""

    def __init__(self, model: str | os.PathLike, spans: Sequence[tuple[int, int]], *,
                 threads: int = 1, extra_args: Sequence[str] = (), log_dir: str | os.PathLike | None = None,
                 start_timeout: float = 120.0, swarm_key: str | os.PathLike | None = None) -> None:
        self.model, self.spans, self.threads = str(model), list(spans), threads
        self.extra_args = list(extra_args) + (["--swarm-key", str(swarm_key)] if swarm_key is not None else [])
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="lamina-swarm-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.nodes: list[NodeProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return [self.nodes[0].addr] if self.nodes else []

    def node_args(self, start: int, end: int) -> list[str]:
        args = ["--blocks", f"{start}:{end}", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--num-threads", str(self.threads), *self.extra_args]
        args += ["--initial-peers", *self.initial_peers] if self.nodes else ["--new-swarm"]
        return args

    def add_node(self, start: int, end: int, *extra: str) -> NodeProcess:
        n = len(self.nodes)
        node = start_node(self.model, [*self.node_args(start, end), *extra],
                          self.log_dir / f"node{n}-{start}-{end}.log", self.start_timeout)
        self.nodes.append(node)
        return node

    def start(self) -> "LocalSwarm":
        """The first node starts the swarm; the others start together and join through it."""
        spawned: list[tuple[subprocess.Popen, Path]] = []
        try:
            first, *rest = self.spans
            self.add_node(*first)
            for n, (start, end) in enumerate(rest, 1):
                log = self.log_dir / f"node{n}-{start}-{end}.log"
                spawned.append((spawn_node(self.model, self.node_args(start, end), log), log))
            for proc, log in spawned:
                self.nodes.append(wait_ready(proc, log, self.start_timeout))
        except BaseException:
            for proc, _ in spawned:
                if proc.poll() is None and all(node.proc is not proc for node in self.nodes):
                    proc.kill()
                    proc.wait()
            self.stop()
            raise
        return self

    def stop(self, grace: float = 30.0) -> list[int | None]:
        """SIGTERM every node (they drain and exit 0), SIGKILL stragglers; returns exit codes."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.signal(signal.SIGCONT)            # a stopped process cannot handle SIGTERM
                node.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                codes.append(node.proc.wait())
            if node.proc.stdout:
                node.proc.stdout.close()
        return codes

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
