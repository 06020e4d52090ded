"""Real `run-node` processes on loopback: the serving line, drain on SIGTERM, --num-blocks.

Each test waits for the 'serving blocks' line on stdout (never a fixed sleep) and drives the node
from an in-test client host."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio

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
