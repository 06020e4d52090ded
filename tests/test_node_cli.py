"""Real `run-node` processes on loopback: the serving line, drain on SIGTERM, --num-blocks.

Each test waits for the 'serving blocks' line on stdout (never a fixed sleep) and drives the node
from an in-test client host."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio

import crdt
import p2p
from _wait import eventually
from pipeline import load_span, model_hash
from pipeline.protocol import (INFERENCE_PROTOCOL, CloseSession, OpenSession, SessionOpened, Step,
                               StepResult, new_session_id)
from pipeline.launch import LocalSwarm

pytestmark = pytest.mark.slow  # every test starts run-node processes
STARTUP_DEADLINE = 90  # a cold start imports torch and py-libp2p on shared cores
SERVING = re.compile(r"^serving blocks (\d+):(\d+) at (.+)$")


class NodeProcess:
    def __init__(self, proc: trio.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.blocks: tuple[int, int] = (0, 0)
        self.addrs: list[str] = []

    @property
    def loopback(self) -> str:
        return next(a for a in self.addrs if a.startswith("/ip4/127.0.0.1/"))

    @property
    def peer_id(self) -> str:
        return self.loopback.rsplit("/p2p/", 1)[1]

    async def wait_serving(self) -> None:
        buffer = b""
        with trio.fail_after(STARTUP_DEADLINE):
            while b"\n" not in buffer:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"run-node exited before serving:\n{self.log.read_text()}")
                buffer += chunk
        line, rest = buffer.split(b"\n", 1)
        assert rest == b"", f"more than one line on stdout: {buffer!r}"
        match = SERVING.match(line.decode())
        assert match, f"unexpected stdout line {line!r}"
        self.blocks = (int(match[1]), int(match[2]))
        self.addrs = match[3].split()
        assert all(re.fullmatch(r"/ip4/[\d.]+/tcp/\d+/p2p/\w+", a) for a in self.addrs), self.addrs

    async def wait_exit(self, deadline: float = 60) -> int:
        with trio.fail_after(deadline):
            return await self.proc.wait()


@asynccontextmanager
async def run_node(micro_model: Path, tmp_path: Path, name: str, *args: str) -> AsyncIterator[NodeProcess]:
    log = tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "node._cli", "--model", str(micro_model), "--listen", "/ip4/127.0.0.1/tcp/0",
               "--num-threads", "1", "--cache-dir", str(tmp_path / "cache"), *args]
    with open(log, "wb") as stderr:
        proc = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=stderr,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    node = NodeProcess(proc, log)
    try:
        await node.wait_serving()
        yield node
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
        await proc.stdout.aclose()


@asynccontextmanager
async def client_for(node: NodeProcess) -> AsyncIterator[p2p.Host]:
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                            enable_dht=False, enable_gossip=False)
    async with p2p.open_host(config) as host:
        await host.connect(node.loopback)
        yield host


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def try_open(host: p2p.Host, node: NodeProcess, micro_model: Path) -> str | None:
    """Open (and close) a probe session: None if it opened, else the error code."""
    probe = new_session_id()
    try:
        async with host.open_session(node.peer_id, INFERENCE_PROTOCOL) as stream:
            await stream.send(OpenSession(probe, model_hash(micro_model), 0, 4, 8, 1, "float32"))
            with trio.fail_after(30):
                assert type(await stream.receive()) is SessionOpened
            await stream.send(CloseSession(probe))
    except BaseException as exc:  # noqa: BLE001 - the session's nursery wraps it in a group
        error = _leaf(exc)
        if isinstance(error, p2p.RemoteError):
            return error.code
        raise
    return None


async def test_sigterm_drains_running_sessions_refuses_new_ones_and_exits_0(micro_model, tmp_path) -> None:
    local = load_span(micro_model, 0, 4)
    cache = local.new_cache(1, 32)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, t, 64, generator=gen) for t in (4, 1, 1, 1)]
    async with run_node(micro_model, tmp_path, "drain", "--blocks", "0:4", "--new-swarm") as node, \
            client_for(node) as host:
        assert node.blocks == (0, 4)
        sid = new_session_id()
        async with host.open_session(node.peer_id, INFERENCE_PROTOCOL) as stream:
            await stream.send(OpenSession(sid, model_hash(micro_model), 0, 4, 32, 1, "float32"))
            with trio.fail_after(30):
                assert type(await stream.receive()) is SessionOpened
            position = 0
            for i, h in enumerate(inputs):
                if i == 2:
                    node.proc.send_signal(signal.SIGTERM)
                    # a new session is refused as soon as the node drains (until the signal is
                    # handled, the probe opens: try again)
                    async def refused() -> bool:
                        return await try_open(host, node, micro_model) == "draining"

                    await eventually(refused, timeout=30, interval=0.05)
                # the running session keeps working after SIGTERM
                await stream.send(Step(sid, i + 1, position, p2p.Tensor.from_torch(h)))
                with trio.fail_after(30):
                    reply = await stream.receive()
                assert type(reply) is StepResult
                torch.testing.assert_close(reply.hidden.to_torch(), local(h, position, cache), rtol=1e-5, atol=1e-5)
                position += h.shape[1]
            assert node.proc.returncode is None  # still draining while the session is open
            await stream.send(CloseSession(sid))
        assert await node.wait_exit() == 0
    log = node.log.read_text()
    assert "draining" in log and "left the swarm" in log and "Traceback" not in log, log
    # what a newcomer reads: the device --device auto chose (no GPU here: the CPU), the model's
    # identity, and a line before and after loading (the span, bytes, seconds)
    expected_device = "cpu (--device auto: no CUDA GPU or Apple MPS device found)" if not torch.cuda.is_available() \
        else "cuda ("
    assert f"device {expected_device}" in log, log
    assert re.search(r"model \S+: identity [0-9a-f]{16} \(config and weights", log), log
    assert re.search(r"loading blocks 0:4 of \S+: [\d.]+ KiB in 36 tensors, onto (cpu|cuda)", log), log
    assert re.search(r"loaded blocks 0:4 in [\d.]+ s: [\d.]+ KiB read from 1 file \(36 tensors\)", log), log


async def test_num_blocks_fills_the_uncovered_span(micro_model, tmp_path) -> None:
    async with run_node(micro_model, tmp_path, "first", "--blocks", "0:2", "--new-swarm") as first:
        async with run_node(micro_model, tmp_path, "second", "--num-blocks", "2",
                            "--initial-peers", first.loopback) as second:
            assert first.blocks == (0, 2)
            assert second.blocks == (2, 4)
            second.proc.send_signal(signal.SIGTERM)
            first.proc.send_signal(signal.SIGTERM)
            assert await second.wait_exit() == 0
            assert await first.wait_exit() == 0


def test_a_frozen_peer_does_not_hold_up_a_joining_node(tiny_model, tmp_path) -> None:
    """One peer of the swarm is frozen (SIGSTOP, a sleeping laptop): a node joining through
    another peer serves as soon as it does when all are alive. (Its DHT lookup asks the frozen
    peer; it used to hold the start for the whole bootstrap deadline, 15 s.)"""
    with LocalSwarm(tiny_model, [(0, 4), (4, 8)], log_dir=tmp_path) as swarm:
        started = time.monotonic()
        swarm.add_node(0, 8)
        alive = time.monotonic() - started
        swarm.nodes[1].signal(signal.SIGSTOP)
        started = time.monotonic()
        swarm.add_node(0, 8)
        frozen = time.monotonic() - started
        swarm.nodes[1].signal(signal.SIGCONT)
    assert frozen < alive + p2p.constants.BOOTSTRAP_DEADLINE / 2, (alive, frozen)


# -- a newcomer's mistakes: one line each, a bounded wait, exit 1 ------------------------------------
def _run_node_to_exit(micro_model: Path, *args: str, timeout: float = STARTUP_DEADLINE + 30):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "node._cli", "--model", str(micro_model), "--blocks", "0:2",
                           "--num-threads", "1", *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("run-node: error: "), proc.stderr
    return line


def test_unreachable_initial_peers_exit_1_naming_each_address(micro_model, tmp_path) -> None:
    """Every --initial-peers address fails (nothing listens at one; the other accepts TCP but
    never speaks): run-node exits 1 within the dial deadline plus its start, in one line naming
    both addresses and why, instead of serving as a swarm of one."""
    peer, other = p2p.Identity.generate().peer_id_str, p2p.Identity.generate().peer_id_str
    with socket.socket() as closed, socket.socket() as silent:
        closed.bind(("127.0.0.1", 0))            # bound, not listening: connections are refused
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)                         # the kernel accepts; nobody ever answers
        refused = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}/p2p/{peer}"
        mute = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{other}"
        proc, took = _run_node_to_exit(micro_model, "--initial-peers", refused, mute,
                                       "--listen", "/ip4/127.0.0.1/tcp/0", "--cache-dir", str(tmp_path))
    line = _error_line(proc)
    assert line.startswith("run-node: error: none of --initial-peers could be reached: "), line
    assert f"{refused} (the connection was refused" in line, line
    assert f"{mute} (dialing {other} took more than {p2p.constants.DIAL_DEADLINE}s)" in line, line
    assert "--new-swarm starts a new swarm instead" in line
    assert p2p.constants.DIAL_DEADLINE <= took < p2p.constants.BOOTSTRAP_DEADLINE + STARTUP_DEADLINE, took
    assert "serving blocks" not in proc.stderr


@pytest.mark.parametrize("listen, message", [
    ("in use", "port {port} is in use (another lamina process?)"),
    ("/ip4/192.0.2.77/tcp/0", "cannot assign requested address (not an address of this machine)"),
])
def test_a_listen_address_that_cannot_be_bound_is_one_line(micro_model, tmp_path, listen, message) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        addr = f"/ip4/127.0.0.1/tcp/{port}" if listen == "in use" else listen
        proc, _ = _run_node_to_exit(micro_model, "--new-swarm", "--listen", addr, "--cache-dir", str(tmp_path))
    assert _error_line(proc) == f"run-node: error: cannot listen on {addr}: {message.format(port=port)}"


def test_fine_tunes_with_one_config_never_mix(micro_model, tmp_path) -> None:
    """Two checkpoints with the same config.json and other weights (a fine-tune of block 3)
    are two models: a client of one never routes through the other's nodes, and generates its
    own model's tokens once its own nodes cover every block."""
    from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM, SwarmUnavailableError
    from pipeline.launch import start_node
    from safetensors.torch import load_file, save_file

    tuned = Path(shutil.copytree(micro_model, tmp_path / "tuned"))
    weights = load_file(str(tuned / "model.safetensors"))
    weights["model.layers.3.mlp.down_proj.weight"] = weights["model.layers.3.mlp.down_proj.weight"] * 1.5
    save_file(weights, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    assert (tuned / "config.json").read_bytes() == (micro_model / "config.json").read_bytes()
    assert model_hash(tuned) != model_hash(micro_model)
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    local = LocalModelForCausalLM.from_pretrained(micro_model)
    expected = local.generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert not torch.equal(LocalModelForCausalLM.from_pretrained(tuned).generate(prompt, max_new_tokens=8,
                                                                                 eos_token_id=[]), expected)
    with LocalSwarm(micro_model, [(0, 2)], log_dir=tmp_path) as swarm:
        other = start_node(tuned, ["--blocks", "2:4", "--listen", "/ip4/127.0.0.1/tcp/0", "--num-threads", "1",
                                   "--initial-peers", *swarm.initial_peers], tmp_path / "tuned.log")
        swarm.nodes.append(other)   # stopped with the swarm
        with pytest.raises(SwarmUnavailableError, match=r"serves blocks \[2, 4\)"):
            with DistributedModelForCausalLM.from_pretrained(micro_model, initial_peers=swarm.initial_peers,
                                                             connect_timeout=5):
                pass
        swarm.add_node(2, 4)
        with DistributedModelForCausalLM.from_pretrained(micro_model, initial_peers=swarm.initial_peers) as model:
            with model.inference_session(max_length=32) as session:
                out = model.generate(prompt, max_new_tokens=8, eos_token_id=[], session=session)
                route = [hop.peer_id for hop in session.route]
            tuned_servers = model._model.view.servers(model_hash(tuned))
        assert other.peer_id not in route and route == [swarm.nodes[0].peer_id, swarm.nodes[2].peer_id]
        assert [crdt.peer_id_to_str(r.peer_id) for r in tuned_servers] == [other.peer_id]  # seen, not used
        assert torch.equal(out, expected)
