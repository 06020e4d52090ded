"""The engine against transformers, per family: logits, prefill+decode, span composition, greedy."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, assert_decisive
from pipeline import LocalModelForCausalLM, load_client_head, load_span

torch.manual_seed(1234)
PROMPT = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(7))


@pytest.fixture(params=FAMILIES)
def family(request, hf_checkpoint):
    path, hf = hf_checkpoint(request.param)
    return path, hf, LocalModelForCausalLM.from_pretrained(path, dtype="float32")


def test_full_logits_match_transformers(family):
    _, hf, ours = family
    with torch.no_grad():
        ref = hf(PROMPT).logits
    assert (ours(PROMPT).logits - ref).abs().max().item() < 1e-4


def test_prefill_then_decode_equals_full_forward(family):
    path, _, ours = family
    full = ours(PROMPT).logits
    span, head = ours.span, ours.head
    cache = span.new_cache(2, PROMPT.shape[1])
    prefill = 6
    out = [head.logits(span(head.embed(PROMPT[:, :prefill]), 0, cache))]
    for pos in range(prefill, PROMPT.shape[1]):
        out.append(head.logits(span(head.embed(PROMPT[:, pos:pos + 1]), pos, cache)))
    stepped = torch.cat(out, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4


def test_spans_compose_to_the_full_model_exactly(family):
    path, _, ours = family
    layers = ours.config.num_hidden_layers
    head = load_client_head(path)
    for a in range(1, layers):
        first, second = load_span(path, 0, a), load_span(path, a, layers)
        c1, c2 = first.new_cache(2, 32), second.new_cache(2, 32)
        h = second(first(head.embed(PROMPT), 0, c1), 0, c2)
        full_cache = ours.span.new_cache(2, 32)
        ref = ours.span(head.embed(PROMPT), 0, full_cache)
        assert torch.equal(h, ref), f"split at {a} differs"
        assert first.load_report.tensors > 0 and second.start == a


def test_greedy_generation_matches_transformers(family):
    _, hf, ours = family
    with torch.no_grad():
        ref = hf.generate(PROMPT, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert_decisive(hf, ref, 32)
    got = ours.generate(PROMPT, max_new_tokens=32)
    assert got.shape == (2, PROMPT.shape[1] + 32)
    assert torch.equal(got, ref)
