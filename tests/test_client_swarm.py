"""The client library against real `run-node` processes on loopback.

Exactness per family against transformers; failover after SIGKILL and SIGSTOP gives exactly the
tokens of the no-failure run; no replica gives a clear error within the deadline; two clients
at once each get their own correct tokens.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from conftest import FAMILIES
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM
from pipeline._chain import NoReplacementError
from pipeline.launch import LocalSwarm

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
        assert torch.equal(model.generate(PROMPT, max_new_tokens=32), ref_tokens)
        assert (model(PROMPT).logits - ref_logits).abs().max().item() < 1e-4


class KillAfter:
    """A streamer that signals the serving middle node once `n` new tokens have come out."""

    def __init__(self, swarm: LocalSwarm, model, n: int, sig: int) -> None:
        self.swarm, self.model, self.n, self.sig = swarm, model, n, sig
        self.count, self.victim, self.killed_at = -1, None, None

    def put(self, value) -> None:
        self.count += 1
        if self.count == self.n:
            middle = self.model.route[1].peer_id
            self.victim = next(node for node in self.swarm.nodes if node.peer_id == middle)
            self.victim.signal(self.sig)
            self.killed_at = time.monotonic()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    return prompt, local.generate(prompt, max_new_tokens=24, eos_token_id=[])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_failover_gives_identical_tokens(sig, tiny_model, tiny_reference):
    prompt, expected = tiny_reference
    with LocalSwarm(tiny_model, [(0, 3), (3, 6), (3, 6), (6, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            killer = KillAfter(swarm, model, 10, sig)
            out = model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=killer, session=session)
            assert killer.victim is not None
            assert session.chain.failovers >= 1
            new_middle = session.route[1].peer_id
            assert new_middle != killer.victim.peer_id
        assert torch.equal(out, expected)


def test_no_replica_is_a_clear_error_within_the_deadline(tiny_model, tiny_reference):
    prompt, _ = tiny_reference
    with LocalSwarm(tiny_model, [(0, 3), (3, 6), (6, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers, failover_deadline=4.0) as model:
        with model.inference_session(max_length=64):
            killer = KillAfter(swarm, model, 5, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(NoReplacementError, match=r"no server for blocks \[3, 6\)"):
                model.generate(prompt, max_new_tokens=24, eos_token_id=[], streamer=killer)
            assert time.monotonic() - killer.killed_at < 4.0 + 6.0


def test_two_clients_share_nodes_and_get_their_own_tokens(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompts = [torch.tensor([[5, 17, 300, 41]]), torch.tensor([[900, 3, 3, 77, 12, 8]])]
    expected = [local.generate(p, max_new_tokens=20, eos_token_id=[]) for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    with LocalSwarm(tiny_model, [(0, 4), (4, 8)]) as swarm:
        barrier = threading.Barrier(2)

        def client(i: int) -> None:
            try:
                with DistributedModelForCausalLM.from_pretrained(
                        tiny_model, initial_peers=swarm.initial_peers) as model:
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


def test_session_continues_across_generate_calls(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([[7, 8, 9, 10]])
    whole = local.generate(prompt, max_new_tokens=12, eos_token_id=[])
    with LocalSwarm(tiny_model, [(0, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=64) as session:
            first = model.generate(prompt, max_new_tokens=6, eos_token_id=[])
            assert session.position == 4 + 5          # the 6th new token is not run yet
            more = model.generate(None, max_new_tokens=6, eos_token_id=[])   # continue
        assert torch.equal(first, whole[:, :10])
        assert torch.equal(torch.cat([first, more], dim=1), whole)
