"""Spot-checking (`pipeline._spotcheck`): a client re-runs a sample of its steps on second servers.

A real malicious node (tests/_liar_node.py: a `run-node` adding 5% noise to its outputs and
announcing three times its speed, so routers prefer it) serves the tiny model's blocks beside
two honest servers of them; through it, unchecked, the tokens come out wrong. A client checking 1 step in 5 catches it within the first window of 5 steps,
never routes through it again, reports it, and returns exactly the local model's tokens. The
sampler's bound, the comparison and the generation's restart are checked without a network.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _wait import eventually, eventually_sync
from conftest import assert_decisive
from pipeline import (AsyncDistributedModelForCausalLM, DistributedModelForCausalLM, InvalidOptionError,
                      LocalModelForCausalLM, SpotCheckError)
from pipeline._generation import GenerationConfig, Redo, generate
from pipeline._routing import choose_route
from pipeline._spotcheck import Sampler, compare
from pipeline._swarm import now_ms
from pipeline.launch import LocalSwarm, spawn_node, wait_ready

LIAR = [sys.executable, str(Path(__file__).with_name("_liar_node.py"))]


# --- without a network -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.01, 1.0), seed=st.integers(0, 2**32), steps=st.integers(1, 400))
def test_one_step_in_every_window_is_checked_so_checks_are_never_far_apart(rate, seed, steps):
    sampler = Sampler(rate, random.Random(seed))
    window = sampler.window
    assert window == max(1, round(1 / rate))
    checked = [i for i in range(steps) if sampler.sample()]
    assert [i // window for i in checked] == list(range(len(checked)))   # one per window, in order
    assert steps // window <= len(checked) <= -(-steps // window)         # every full window has its one
    gaps = [b - a for a, b in zip([-1] + checked, checked)]
    assert all(gap <= 2 * window - 1 for gap in gaps[1:]) and (not gaps or gaps[0] <= window)


def test_rate_zero_checks_nothing_and_bad_rates_are_refused():
    sampler = Sampler(0.0)
    assert not any(sampler.sample() for _ in range(100))
    for bad in (-0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(InvalidOptionError, match="spot_check"):
            Sampler(bad)


def test_compare_finds_the_first_position_beyond_the_tolerance():
    want = torch.randn(2, 6, 16)
    assert compare(want.clone(), want, 1e-2)[1] is None
    got = want.clone()
    got[1, 4] *= 1.05             # row 1, position 4: 5% off
    err, first = compare(got, want, 1e-2)
    assert first == 4 and err == pytest.approx(0.05, rel=1e-3)
    got[0, 2] = float("nan")
    assert compare(got, want, 1e-2)[1] == 2
    assert compare(want[:, :5], want, 1e-2) == (float("inf"), 0)


class _Tokens:
    """A streamer that keeps what it was shown."""

    def __init__(self) -> None:
        self.prompt: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2:
            self.prompt.append(value)
        else:
            self.tokens.extend(value.tolist())

    def end(self) -> None:
        self.ended += 1


@pytest.mark.parametrize("fail_at", [1, 2, 7])
def test_a_redo_starts_the_generation_again_and_the_streamer_sees_each_token_once(tiny_model, fail_at):
    model = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([model.tokenizer.encode("Once more, from the top")])
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=())
    plain = model.generate(prompt, max_new_tokens=10, eos_token_id=[])
    step_fn = _cached_step(model, prompt.shape[1] + 10)
    shown = _Tokens()
    out = generate(_local_step_of(step_fn, fail_at, prompt.shape[1] - 1), model.head, prompt, cfg, shown)
    assert torch.equal(out, plain)
    assert shown.tokens == plain[0, prompt.shape[1]:].tolist() and len(shown.prompt) == 1 and shown.ended == 1


def _cached_step(model: LocalModelForCausalLM, max_length: int):
    cache = model.span.new_cache(1, max_length)
    return lambda hidden, start: model.span(hidden, start, cache)


def _local_step_of(step_fn, fail_at: int, position: int):
    calls = {"n": 0}

    def step(hidden: torch.Tensor, start: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Redo(position, "a-faulty-node")
        return step_fn(hidden, start)

    return step


def test_a_streamed_token_that_a_redo_changes_is_an_error_not_a_silent_change(tiny_model):
    model = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([model.tokenizer.encode("What was shown stays shown")])
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=())
    step_fn = _cached_step(model, prompt.shape[1] + 6)
    calls = {"n": 0}

    def step(hidden: torch.Tensor, start: int) -> torch.Tensor:
        calls["n"] += 1
        out = step_fn(hidden, start)
        if calls["n"] == 1:         # the first new token is chosen from wrong outputs...
            return -out
        if calls["n"] == 4:         # ...which a spot check finds two steps later
            raise Redo(0, "a-faulty-node")
        return out

    shown = _Tokens()
    with pytest.raises(SpotCheckError, match="streamed"):
        generate(step, model.head, prompt, cfg, shown)


def test_a_redo_before_the_call_started_is_an_error(tiny_model):
    model = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([model.tokenizer.encode("Too late")])
    cfg = GenerationConfig(max_new_tokens=4, eos_token_id=())

    def step(hidden: torch.Tensor, start: int) -> torch.Tensor:
        raise Redo(start - 1, "a-faulty-node")

    with pytest.raises(SpotCheckError, match="earlier calls"):
        generate(step, model.head, prompt, cfg, start=5)


# --- a malicious node in a real swarm ----------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("The careful client checked the numbers and")])
    return prompt, assert_decisive(local, local.generate(prompt, max_new_tokens=16, eos_token_id=[]), 16)


@pytest.fixture(scope="module")
def liar_swarm(tiny_model):
    """Every block on the liar and on two honest nodes (one route hop: no inter-node RTT, which
    nodes measure while busy starting, decides the route; the liar's claimed speed does)."""
    with LocalSwarm(tiny_model, [(0, 8), (0, 8)]) as swarm:
        log = swarm.log_dir / "liar-0-8.log"
        proc = spawn_node(tiny_model, swarm.node_args(0, 8), log, prefix=LIAR)
        liar = wait_ready(proc, log)
        swarm.nodes.append(liar)
        yield swarm, liar


@pytest.mark.slow
async def test_a_perturbing_node_is_caught_within_one_window_and_the_tokens_are_the_references(
        tiny_model, reference, liar_swarm):
    prompt, expected = reference
    swarm, liar = liar_swarm
    honest = [node.peer_id for node in swarm.nodes[:2]]
    async with AsyncDistributedModelForCausalLM.from_pretrained(   # unchecked, through the liar
            tiny_model, initial_peers=swarm.initial_peers, blocked_servers=honest) as model:
        await _wait_for_servers(model, 3)
        assert not torch.equal(await model.generate(prompt, max_new_tokens=16, eos_token_id=[]), expected)
    async with AsyncDistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=swarm.initial_peers, spot_check=0.2) as model:
        await _wait_for_servers(model, 3)
        await eventually(lambda: liar.peer_id in _route(model), timeout=30, what="a route through the liar")
        async with model.inference_session(max_length=64) as session:
            out = await model.generate(prompt, max_new_tokens=16, eos_token_id=[], session=session)
            route = [hop.peer_id for hop in session.route]
        stats = model.spot_check_stats
        assert torch.equal(out, expected)
        assert list(stats.faulty) == [liar.peer_id], stats
        assert stats.caught_at[liar.peer_id] <= 5          # the first window of 1 / 0.2 steps
        assert liar.peer_id not in route and stats.rebuilds == 1
        assert stats.mismatches >= 1
        # the next generation never touches it, and still checks
        before = stats.steps
        out = await model.generate(prompt, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(out, expected) and stats.steps > before and list(stats.faulty) == [liar.peer_id]


@pytest.mark.slow
def test_the_sync_client_streams_each_verified_token_once(tiny_model, reference, liar_swarm):
    """Checking 1 step in 2: when the check comes at the second step, the first token was
    already streamed from the liar's outputs; the generation starts again and the streamer
    sees each token once."""
    prompt, expected = reference
    swarm, liar = liar_swarm
    with DistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=swarm.initial_peers, spot_check=0.5) as model:
        eventually_sync(lambda: liar.peer_id in _route(model._model), timeout=30, what="a route through the liar")
        shown = _Tokens()
        out = model.generate(prompt, max_new_tokens=16, eos_token_id=[], streamer=shown)
        stats = model.spot_check_stats
    assert torch.equal(out, expected)
    assert shown.tokens == expected[0, prompt.shape[1]:].tolist() and len(shown.prompt) == 1 and shown.ended == 1
    assert list(stats.faulty) == [liar.peer_id] and stats.caught_at[liar.peer_id] <= 2
    # caught at the prefill: its output is recomputed, nothing to redo; at the second step:
    # the first token came from the liar's outputs, so the generation started again
    assert stats.redos == (stats.caught_at[liar.peer_id] == 2)


@pytest.mark.slow
@pytest.mark.parametrize("wire_format", [None, "float16+int8:4"])
async def test_spot_checking_an_honest_route_changes_nothing(tiny_model, reference, liar_swarm, wire_format):
    """Every step checked; with an int8 wire format too (the prompt's step packed, the
    decode steps in float16: the check replays them as one packed chunk, rounded otherwise)."""
    prompt, expected = reference
    swarm, liar = liar_swarm
    async with AsyncDistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=swarm.initial_peers, spot_check=1.0, blocked_servers=[liar.peer_id],
            wire_format=wire_format) as model:
        await _wait_for_servers(model, 3)
        out = await model.generate(prompt, max_new_tokens=16, eos_token_id=[])
        stats = model.spot_check_stats
        if wire_format is None:
            assert torch.equal(out, expected)
        assert stats.steps == 16 and stats.hops == 16 and stats.unchecked == 0
        assert stats.mismatches == 0 and not stats.faulty and stats.rebuilds == 0


def _route(model) -> list[str]:
    """The peers a new session of `model` would route through now."""
    servers = model.view.servers(model.model_hash)
    hops = choose_route(servers, 0, model.config.num_hidden_layers, now_ms=now_ms(),
                        options=model.options.chain.route_options)
    return [hop.peer_id for hop in hops]


async def _wait_for_servers(model, n: int) -> None:
    await eventually(lambda: len(model.view.servers(model.model_hash)) >= n, timeout=30)
