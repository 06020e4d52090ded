"""The benchmarks' WAN lab: `run-node` processes on public hosts of a NatLab internet
(tests/netlab.py), every host's outbound traffic held `delay_ms` by the lab's link emulator
(`netlab.shape`), so any two hosts see a one-way latency of `delay_ms`.

    with wan_swarm(model_dir, [(0, 3), (3, 6), (6, 8)], 25.0, logs, "d25") as swarm:
        client = swarm.add_client("client")        # a shaped public host of the same internet
        proc = client.popen([sys.executable, "worker.py", "--peer", swarm.first])

Used by bench_wan.py and bench_swarm.py --links. Needs root, `ip` and `nft` (the lab).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from netlab import LabHost, NatLab, shape  # noqa: E402


def spans(layers: int, parts: int) -> list[tuple[int, int]]:
    """`layers` blocks cut into `parts` contiguous spans of (nearly) equal size."""
    cuts = [round(i * layers / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]


@dataclass
class WanSwarm:
    lab: NatLab
    delay_ms: float
    first: str                                   # the first node's multiaddr, at its lab address
    nodes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)   # the nodes' logs, in order
    emulators: list[subprocess.Popen] = field(default_factory=list)   # userspace link emulators (no netem)

    def shape(self, host: LabHost) -> None:
        if (proc := shape(host, self.delay_ms)) is not None:
            self.emulators.append(proc)

    def add_client(self, name: str) -> LabHost:
        """Another public host (`name`: [a-z][a-z0-9_]*), its traffic shaped like the nodes'."""
        host = self.lab.add_public_host(name)
        self.shape(host)
        return host


@contextmanager
def wan_swarm(model_dir: Path, parts: Sequence[tuple[int, int]], delay_ms: float, logs: Path, tag: str, *,
              threads: int = 1, extra_args: Sequence[str] = (), graceful: bool = False,
              start_timeout: float = 120.0) -> Iterator[WanSwarm]:
    """A NatLab with one shaped public host per span (`n0`, `n1`, ...), each running `run-node`
    for its span; ready when every node serves. Node i logs to `logs/{tag}-node{i}.log`. On exit
    the nodes are SIGKILLed, or with `graceful` SIGTERMed first (they drain, and log their
    batching statistics on the way out), then the lab is closed."""
    from pipeline.launch import spawn_node, wait_ready

    with NatLab() as lab:
        hosts = [lab.add_public_host(f"n{i}") for i in range(len(parts))]
        swarm = WanSwarm(lab, delay_ms, first="")
        for host in hosts:
            swarm.shape(host)
        try:
            for i, (host, (a, b)) in enumerate(zip(hosts, parts)):
                argv = ["--blocks", f"{a}:{b}", "--listen", "/ip4/0.0.0.0/tcp/0", "--num-threads", str(threads),
                        *extra_args, *(["--initial-peers", swarm.first] if swarm.first else ["--new-swarm"])]
                log = logs / f"{tag}-node{i}.log"
                swarm.nodes.append(spawn_node(model_dir, argv, log, prefix=host.wrap([])))
                swarm.logs.append(log)
                if not swarm.first:
                    node = wait_ready(swarm.nodes[0], log, timeout=start_timeout)
                    swarm.first = re.sub(r"^/ip4/[^/]+/", f"/ip4/{host.ip}/", node.addr)   # its lab address
            for proc, log in zip(swarm.nodes[1:], swarm.logs[1:]):
                wait_ready(proc, log, timeout=start_timeout)
            yield swarm
        finally:
            _stop_nodes(swarm.nodes, graceful)


def _stop_nodes(procs: list[subprocess.Popen], graceful: bool, grace: float = 30.0) -> None:
    if graceful:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
