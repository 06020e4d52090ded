"""The client library against real `run-node` processes on loopback.

Exactness per family against transformers; failover after SIGKILL and SIGSTOP gives exactly the
tokens of the no-failure run; no replica gives a clear error within the deadline; two clients
at once each get their own correct tokens.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import trio

from conftest import FAMILIES, assert_decisive
from pipeline import AsyncDistributedModelForCausalLM, DistributedModelForCausalLM, LocalModelForCausalLM
from pipeline._chain import NoReplacementError
from pipeline.launch import LocalSwarm

pytestmark = pytest.mark.slow  # run-node processes (LocalSwarm), or nodes in this process with timeouts
PROMPT = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_logits_match_transformers(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    spans = [(0, 1), (1, 3), (3, 4)] if family == "llama" else [(0, 2), (2, 4)]
    with LocalSwarm(path, spans) as swarm, \
            DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                        dtype="float32") as model:
        with torch.no_grad():
            ref_tokens = hf.generate(PROMPT, max_new_tokens=32, do_sample=False, pad_token_id=0)
            ref_logits = hf(PROMPT).logits
        assert_decisive(hf, ref_tokens, 32)
        assert torch.equal(model.generate(PROMPT, max_new_tokens=32), ref_tokens)
        assert (model(PROMPT).logits - ref_logits).abs().max().item() < 1e-4


class KillAfter:
    """A streamer that signals the node serving hop `hop` of the route (the middle one by
    default) once `n` new tokens have come out."""

    def __init__(self, swarm: LocalSwarm, model, n: int, sig: int, hop: int = 1) -> None:
        self.swarm, self.model, self.n, self.sig, self.hop = swarm, model, n, sig, hop
        self.count, self.victim, self.killed_at = -1, None, None

    def put(self, value) -> None:
        self.count += 1
        if self.count == self.n:
            target = self.model.route[self.hop].peer_id
            self.victim = next(node for node in self.swarm.nodes if node.peer_id == target)
            self.victim.signal(self.sig)
            self.killed_at = time.monotonic()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    return prompt, assert_decisive(local, local.generate(prompt, max_new_tokens=24, eos_token_id=[]), 24)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
@pytest.mark.parametrize("hop", [1, 2], ids=["middle", "last"])
def test_failover_gives_identical_tokens(sig, hop, tiny_model, tiny_reference):
    # the last node's stream is read by the stepping task itself (the others by their tasks)
    prompt, expected = tiny_reference
    spans = [(0, 3), (3, 6), (3, 6), (6, 8)] if hop == 1 else [(0, 3), (3, 6), (6, 8), (6, 8)]
    with LocalSwarm(tiny_model, spans) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            killer = KillAfter(swarm, model, 10, sig, hop)
            out = model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=killer, session=session)
            assert killer.victim is not None
            assert session.chain.failovers >= 1
            assert session.route[hop].peer_id != killer.victim.peer_id
        assert torch.equal(out, expected)


def test_no_replica_is_a_clear_error_within_the_deadline(tiny_model, tiny_reference):
    prompt, _ = tiny_reference
    with LocalSwarm(tiny_model, [(0, 3), (3, 6), (6, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers, failover_deadline=4.0) as model:
        with model.inference_session(max_length=64):
            killer = KillAfter(swarm, model, 5, signal.SIGKILL)
            with pytest.raises(NoReplacementError, match=r"no server for blocks \[3, 6\)"):
                model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=killer)
            assert time.monotonic() - killer.killed_at < 4.0 + 6.0


async def test_a_node_that_stops_answering_is_replaced_after_the_step_timeout(tiny_model, tiny_reference, tmp_path):
    """The last node keeps its streams alive (heartbeats flow) but stops answering steps: the
    client, which reads that node's stream itself, gives up on it after `step_timeout`,
    replaces it, and the tokens are exactly the local ones. (Nodes in this process, one with
    its forward passes held back.)"""
    from test_node_serving import running_node

    prompt, expected = tiny_reference
    release = trio.Event()

    async def held(*args):  # the stalled node's passes wait until the end of the test
        await release.wait()
        raise RuntimeError("released at the end of the test")

    async with running_node(tiny_model, tmp_path / "a", blocks=(0, 4)) as first, \
            running_node(tiny_model, tmp_path / "b", blocks=(4, 8), initial_peers=first.addrs) as second, \
            running_node(tiny_model, tmp_path / "c", blocks=(4, 8), initial_peers=first.addrs) as third:
        nodes = {node.peer_id: node for node in (first, second, third)}
        try:
            async with AsyncDistributedModelForCausalLM.from_pretrained(
                    tiny_model, initial_peers=first.addrs, step_timeout=2.0) as model:
                async with model.inference_session(max_length=64) as session:
                    class Stall:
                        count, victim = -1, None

                        def put(self, value) -> None:
                            self.count += 1
                            if self.count == 8:
                                self.victim = session.route[-1].peer_id
                                nodes[self.victim].batcher.run = held

                        def end(self) -> None:
                            pass

                    stall = Stall()
                    with trio.fail_after(60):
                        out = await model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=stall,
                                                   session=session)
                    assert stall.victim is not None and session.chain.failovers == 1
                    assert session.route[-1].peer_id != stall.victim
        finally:
            release.set()
    assert torch.equal(out, expected)


def test_sessions_use_lanes_and_fall_back_to_libp2p_per_node(tiny_model, tiny_reference):
    """The first node offers lanes, the second runs with --no-lanes: the chain mixes both
    transports (client -> n1 on a lane, n1 -> n2 and client -> n2 on libp2p) and the tokens
    are the local ones."""
    prompt, expected = tiny_reference
    with LocalSwarm(tiny_model, [(0, 4)]) as swarm:
        swarm.add_node(4, 8, "--no-lanes")
        with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
            with model.inference_session(max_length=64) as session:
                out = model.generate(prompt, max_new_tokens=24, eos_token_id=[], session=session)
                assert [link.session.transport for link in session.chain.links] == ["lane", "libp2p"]
    assert torch.equal(out, expected)


@pytest.fixture(scope="module")
def tiny_swarm(tiny_model):
    """Two nodes for the tests that kill nothing."""
    with LocalSwarm(tiny_model, [(0, 4), (4, 8)]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tiny_local(tiny_model):
    return LocalModelForCausalLM.from_pretrained(tiny_model)


def test_two_clients_share_nodes_and_get_their_own_tokens(tiny_model, tiny_swarm, tiny_local):
    prompts = [torch.tensor([[5, 17, 300, 41]]), torch.tensor([[900, 3, 3, 77, 12, 8]])]
    expected = [assert_decisive(tiny_local, tiny_local.generate(p, max_new_tokens=20, eos_token_id=[]), 20)
                for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def client(i: int) -> None:
        try:
            with DistributedModelForCausalLM.from_pretrained(
                    tiny_model, initial_peers=tiny_swarm.initial_peers) as model:
                barrier.wait(timeout=60)
                results[i] = model.generate(prompts[i], max_new_tokens=20, eos_token_id=[])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], expected[i])


def test_session_continues_across_generate_calls(tiny_model, tiny_swarm, tiny_local):
    prompt = torch.tensor([[7, 8, 9, 10]])
    whole = assert_decisive(tiny_local, tiny_local.generate(prompt, max_new_tokens=12, eos_token_id=[]), 12)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=tiny_swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            first = model.generate(prompt, max_new_tokens=6, eos_token_id=[])
            assert session.position == 4 + 5          # the 6th new token is not run yet
            more = model.generate(None, max_new_tokens=6, eos_token_id=[])   # continue
            logits = model(torch.tensor([[11, 12]])).logits   # a forward inside the session
        assert torch.equal(first, whole[:, :10])
        assert torch.equal(torch.cat([first, more], dim=1), whole)
        assert logits.shape == (1, 2, tiny_local.config.vocab_size)


def test_sync_api_works_inside_a_running_event_loop(tiny_model, tiny_swarm, tiny_local):
    """As in Jupyter: the caller's thread already runs an (asyncio) event loop."""
    prompt = torch.tensor([[42, 43, 44]])
    expected = assert_decisive(tiny_local, tiny_local.generate(prompt, max_new_tokens=8, eos_token_id=[]), 8)

    async def notebook_cell():
        assert asyncio.get_running_loop().is_running()
        with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=tiny_swarm.initial_peers) as m:
            return m.generate(prompt, max_new_tokens=8, eos_token_id=[])

    assert torch.equal(asyncio.run(notebook_cell()), expected)


async def test_async_api_for_trio_programs(tiny_model, tiny_swarm, tiny_local):
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = assert_decisive(tiny_local, tiny_local.generate(prompt, max_new_tokens=8, eos_token_id=[]), 8)
    async with AsyncDistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=tiny_swarm.initial_peers) as model:
        out = await model.generate(prompt, max_new_tokens=8, eos_token_id=[])
        logits = (await model.forward(prompt)).logits
    assert torch.equal(out, expected)
    assert (logits - tiny_local(prompt).logits).abs().max().item() < 1e-4


def test_cli_generates_through_the_swarm(tiny_model, tiny_swarm, tiny_local):
    expected = assert_decisive(tiny_local, tiny_local.generate(torch.tensor([[9, 8, 7]]), max_new_tokens=6,
                                                               eos_token_id=[]), 6)
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--model", str(tiny_model),
                        "--initial-peers", *tiny_swarm.initial_peers, "--input-ids", "9,8,7",
                        "--max-new-tokens", "6", "--threads", "1", "--no-eos", "--show-route"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(t) for t in expected[0, 3:].tolist()]
    assert "route:" in r.stderr and "tokens/s" in r.stderr


def test_unreachable_swarm_is_a_clear_error(tiny_model):
    with pytest.raises(Exception, match="could not reach any of initial_peers"):
        DistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWKWdgmX6abxXnU4G57ByV2DtRMGh4VrzfHH1ExKNnewpV"])


def test_client_relayed_mode_gives_the_same_tokens(tiny_model, tiny_swarm, tiny_local):
    """`client_relays=True` (the fallback for nodes that cannot push, forced): every hop's output
    comes back to the client, which sends it on; the tokens are the push chain's."""
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8]])
    expected = assert_decisive(tiny_local, tiny_local.generate(prompt, max_new_tokens=10, eos_token_id=[]), 10)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=tiny_swarm.initial_peers,
                                                     client_relays=True) as model:
        with model.inference_session(max_length=32) as session:
            out = model.generate(prompt, max_new_tokens=10, eos_token_id=[], session=session)
            assert [link.relay for link in session.chain.links] == [True] * (len(session.route) - 1) + [False]
    assert torch.equal(out, expected)
