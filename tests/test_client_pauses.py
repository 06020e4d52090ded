"""A client that pauses: a slow streamer, a blocked event loop, a frozen process, a session a
live node dropped. Real `run-node` processes on loopback; every generation must give exactly the
local reference's tokens.

* The synchronous client runs the user's streamer in the caller's thread: a streamer that
  blocks for 5 s costs nothing but those 5 s (the sessions stay alive, nothing is replayed).
* When the client's event loop is blocked (a slow streamer in the async API) or its whole
  process is frozen (SIGSTOP) for longer than the nodes' heartbeat timeout, the nodes drop its
  sessions. The client tells "my session is gone" from "the node is gone" (the node answers a
  probe, or said so in an error frame), re-opens the sessions on the same nodes and replays.
* A node that really dies, with no replica, is a `LaminaError` naming the missing blocks,
  never a trio `ExceptionGroup`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_decisive
from pipeline import AsyncDistributedModelForCausalLM, DistributedModelForCausalLM, LaminaError, LocalModelForCausalLM
from pipeline._chain import NoReplacementError
from pipeline.launch import LocalSwarm, NodeProcess

pytestmark = pytest.mark.slow
SPANS = [(0, 4), (4, 8)]
DEADLINE = 60.0  # any wait for the nodes here; a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    return prompt, assert_decisive(local, local.generate(prompt, max_new_tokens=24, eos_token_id=[]), 24)


def wait_for_log(node: NodeProcess, text: str, timeout: float = DEADLINE) -> None:
    """Until `text` shows in the node's log (polled: the node writes it when it gets there)."""
    deadline = time.monotonic() + timeout
    while text not in node.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log of node {node.start}:{node.end}:\n{node.log()[-3000:]}")
        time.sleep(0.05)


def wait_until_dropped(swarm: LocalSwarm, session_ids: list[str]) -> None:
    """Until each node has closed our session on it."""
    for node, sid in zip(swarm.nodes, session_ids, strict=True):
        wait_for_log(node, f"session {sid[:8]} closed")


def test_a_streamer_that_blocks_for_5s_costs_nothing_else(tiny_model, reference):
    """The sync client calls the streamer from the caller's thread: its event loop keeps the
    sessions alive meanwhile, so nothing is lost and nothing is replayed."""
    prompt, expected = reference

    class Slow:
        count = -1

        def put(self, value) -> None:
            self.count += 1
            if self.count == 3:
                time.sleep(5.0)  # the scenario itself: a UI or logging hook doing slow work

        def end(self) -> None:
            pass

    with LocalSwarm(tiny_model, SPANS) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            before = [hop.peer_id for hop in session.route]
            out = model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=Slow(), session=session)
            assert session.chain.failovers == 0 and session.chain.reopened == 0
            assert [hop.peer_id for hop in session.route] == before
    assert torch.equal(out, expected)


async def test_a_blocked_event_loop_loses_the_sessions_and_replays_them_on_the_same_nodes(
        tiny_model, reference, caplog):
    """The async API runs the streamer on the event loop. One that blocks until both nodes have
    dropped the sessions (heartbeats stopped): the client re-opens them on the same nodes,
    replays, and the tokens are the reference's."""
    prompt, expected = reference
    caplog.set_level(logging.WARNING, logger="lamina.client")
    with LocalSwarm(tiny_model, SPANS) as swarm:
        async with AsyncDistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers) as model:
            async with model.inference_session(max_length=64) as session:
                before = [hop.peer_id for hop in session.route]

                class Blocking:
                    count = -1

                    def put(self, value) -> None:
                        self.count += 1
                        if self.count == 3:  # blocks the event loop until the nodes gave up on us
                            wait_until_dropped(swarm, [link.session_id for link in session.chain.links])

                    def end(self) -> None:
                        pass

                out = await model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=Blocking(),
                                           session=session)
                assert session.chain.reopened == 2
                assert [hop.peer_id for hop in session.route] == before
    assert torch.equal(out, expected)
    reopened = [r.getMessage() for r in caplog.records if "re-opening a session on it" in r.getMessage()]
    assert len(reopened) == 2, [r.getMessage() for r in caplog.records]


CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from pipeline import DistributedModelForCausalLM

model_path, prompt, peers = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]


class Freeze:
    count = -1

    def put(self, value):
        self.count += 1
        if self.count == 3:
            print("FROZEN", json.dumps([link.session_id for link in session.chain.links]), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, every thread

    def end(self):
        pass


with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=peers) as model:
    with model.inference_session(max_length=64) as session:
        before = [hop.peer_id for hop in session.route]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, eos_token_id=[],
                             streamer=Freeze(), session=session)
        print("RESULT", json.dumps({"tokens": out[0].tolist(), "reopened": session.chain.reopened,
                                    "same_route": [hop.peer_id for hop in session.route] == before}),
              flush=True)
"""


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_client_frozen_for_10s_resumes_with_the_same_tokens(tiny_model, reference):
    """The client process stops itself (SIGSTOP) mid-generation and is continued 10 s later,
    once both nodes have dropped its sessions: the generation goes on from where it stopped,
    through fresh sessions on the same nodes, with the reference's tokens."""
    prompt, expected = reference
    with LocalSwarm(tiny_model, SPANS) as swarm:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model), json.dumps(prompt[0].tolist()),
                                  *swarm.initial_peers], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = child.stdout.readline()
            assert line.startswith("FROZEN"), line + child.stderr.read()
            stopped_at = time.monotonic()
            deadline = stopped_at + DEADLINE
            while not _stopped(child.pid):
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.01)
            wait_until_dropped(swarm, json.loads(line.split(" ", 1)[1]))
            time.sleep(max(0.0, stopped_at + 10.0 - time.monotonic()))  # the scenario: frozen for 10 s
            child.send_signal(signal.SIGCONT)
            out, err = child.communicate(timeout=DEADLINE)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, err
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["tokens"] == expected[0].tolist()
    assert result["reopened"] == 2 and result["same_route"]


def test_a_session_a_live_node_dropped_is_reopened_on_that_node(tiny_model, reference, caplog):
    """Nodes close sessions idle for 1 s; the client pauses between two generate calls until
    both did (each says so: an `idle_timeout` error frame). The next call re-opens the
    sessions on the same nodes, replays, and goes on with the reference's tokens."""
    prompt, expected = reference
    caplog.set_level(logging.WARNING, logger="lamina.client")
    with LocalSwarm(tiny_model, SPANS, extra_args=["--session-idle-timeout", "1"]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            before = [hop.peer_id for hop in session.route]
            first = model.generate(prompt, max_new_tokens=6, eos_token_id=[], session=session)
            for node, link in zip(swarm.nodes, session.chain.links, strict=True):
                wait_for_log(node, f"session {link.session_id[:8]} closed")
            more = model.generate(None, max_new_tokens=18, eos_token_id=[], session=session)
            assert [hop.peer_id for hop in session.route] == before
            assert session.chain.reopened == 2
    assert torch.equal(torch.cat([first, more], dim=1), expected)
    reopened = [r.getMessage() for r in caplog.records if "re-opening a session on it" in r.getMessage()]
    assert len(reopened) == 2 and all("idle_timeout" in m for m in reopened), reopened


class KillSpan:
    """A streamer that SIGKILLs the node serving `span` once `n` new tokens have come out."""

    def __init__(self, swarm: LocalSwarm, span: tuple[int, int], n: int) -> None:
        self.swarm, self.span, self.n, self.count = swarm, span, n, -1

    def put(self, value) -> None:
        self.count += 1
        if self.count == self.n:
            next(node for node in self.swarm.nodes if (node.start, node.end) == self.span).signal(signal.SIGKILL)

    def end(self) -> None:
        pass


def test_a_dead_node_without_replica_is_one_clear_error(tiny_model, reference):
    """generate() without a session (the client opens one for the call): the node serving
    3:6 dies and nothing else serves those blocks. The error is the `NoReplacementError`
    itself, naming the blocks, not an ExceptionGroup around it."""
    prompt, _ = reference
    with LocalSwarm(tiny_model, [(0, 3), (3, 6), (6, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers, failover_deadline=3.0) as model:
        with pytest.raises(LaminaError) as caught:
            model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=KillSpan(swarm, (3, 6), 5))
    assert type(caught.value) is NoReplacementError
    assert str(caught.value).startswith("no server for blocks [3, 6)")


async def test_a_dead_node_without_replica_is_one_clear_error_in_the_async_api(tiny_model, reference):
    prompt, _ = reference
    with LocalSwarm(tiny_model, [(0, 3), (3, 6), (6, 8)]) as swarm:
        async with AsyncDistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers, failover_deadline=3.0) as model:
            with pytest.raises(LaminaError) as caught:
                await model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=KillSpan(swarm, (3, 6), 5))
    assert type(caught.value) is NoReplacementError
    assert str(caught.value).startswith("no server for blocks [3, 6)")
