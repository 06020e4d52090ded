"""Cache rollback and batching in the engine; sampling, EOS, streamer; the tiny model writer."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline import (CacheError, GenerationConfig, LocalModelForCausalLM, Segment, Tokenizer,
                      generate, load_client_head, load_span)
from pipeline._generation import apply_repetition_penalty, apply_top_k, apply_top_p
from pipeline.tiny import EOS_ID, write_tiny_model


@pytest.fixture(scope="module")
def micro(micro_model):
    return LocalModelForCausalLM.from_pretrained(micro_model)


def test_rollback_then_redecode_gives_the_same_hidden(micro):
    span, head = micro.span, micro.head
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    cache = span.new_cache(1, 16)
    first = span(head.embed(ids), 0, cache)
    cache.rollback(6)
    assert cache.length == 6
    again = span(head.embed(ids[:, 6:]), 6, cache)
    assert torch.allclose(again, first[:, 6:], atol=1e-6)
    with pytest.raises(CacheError):
        cache.rollback(12)


def test_segments_batched_equal_each_alone(micro):
    span, head = micro.span, micro.head
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (b, t), generator=g) for b, t in [(1, 7), (2, 1), (1, 4)]]
    alone, caches = [], []
    for p in prompts:
        c = span.new_cache(p.shape[0], 16)
        alone.append(span(head.embed(p), 0, c))
        caches.append(span.new_cache(p.shape[0], 16))
    together = span.forward_segments([Segment(head.embed(p), 0, c) for p, c in zip(prompts, caches)])
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, atol=1e-5)


def test_cache_misuse_is_a_clear_error(micro):
    span, head = micro.span, micro.head
    cache = span.new_cache(1, 8)
    h = head.embed(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(CacheError, match="contiguous"):
        span(h, 2, cache)                                 # gap: cache holds 0 positions
    span(h, 0, cache)
    with pytest.raises(CacheError, match="max_length 8"):
        span(torch.cat([h, h], 1), 4, cache)
    with pytest.raises(CacheError, match="batch of 2"):
        span(torch.cat([h, h], 0), 4, cache)
    with pytest.raises(CacheError, match="hidden states must be"):
        span(h[..., :10], 4, cache)
    with pytest.raises(CacheError, match="computes in torch.float32"):
        span(h.double(), 4, cache)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    assert torch.equal(apply_repetition_penalty(logits, ids, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    assert torch.equal(apply_top_k(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    assert torch.equal(apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(micro):
    ids = torch.tensor([[5, 6, 7]])
    opts = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=40, top_p=0.95,
                repetition_penalty=1.1)
    a = micro.generate(ids, seed=11, **opts)
    b = micro.generate(ids, seed=11, **opts)
    c = micro.generate(ids, seed=12, **opts)
    greedy = micro.generate(ids, max_new_tokens=16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)


def test_eos_stops_and_pads_finished_rows(micro):
    ids = torch.tensor([[5, 6, 7], [9, 9, 9]])
    free = micro.generate(ids, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, 5])                     # the 3rd new token of row 0 becomes "EOS"
    out = micro.generate(ids, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    row0 = out[0, 3:].tolist()
    k = row0.index(stop)
    assert out[0, :3 + k + 1].tolist() == free[0, :3 + k + 1].tolist()
    assert all(t == 0 for t in row0[k + 1:])
    if stop not in free[1, 3:].tolist():
        assert out.shape[1] == 3 + 12 and torch.equal(out[1], free[1])


def test_streamer_gets_prompt_then_each_token_then_end(micro):
    events = []

    class Recorder:
        def put(self, value):
            events.append(value.tolist())

        def end(self):
            events.append("end")

    ids = torch.tensor([[1, 2, 3]])
    out = micro.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=Recorder())
    assert events[0] == [[1, 2, 3]] and events[-1] == "end"
    assert [e[0] for e in events[1:-1]] == out[0, 3:].tolist()


def test_generate_over_any_step_callable(micro_model):
    """Two spans chained by a plain function generate what the whole model does."""
    head, a, b = load_client_head(micro_model), load_span(micro_model, 0, 1), load_span(micro_model, 1, 4)
    ca, cb = a.new_cache(1, 24), b.new_cache(1, 24)
    cfg = GenerationConfig(max_new_tokens=12)
    got = generate(lambda h, s: b(a(h, s, ca), s, cb), head, torch.tensor([[4, 5, 6]]), cfg)
    whole = LocalModelForCausalLM.from_pretrained(micro_model).generate(torch.tensor([[4, 5, 6]]),
                                                                        max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, whole)


def test_bad_generation_options():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(TypeError, match="unknown generation option"):
        GenerationConfig.build(num_beams=4)


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_tiny_writer_is_deterministic_and_loads_in_transformers(tmp_path):
    import transformers

    a = write_tiny_model(tmp_path / "a", "micro")
    b = write_tiny_model(tmp_path / "b", "micro")
    assert _digest(a) == _digest(b)
    hf = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
    ours = LocalModelForCausalLM.from_pretrained(a)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-4


def test_tiny_tokenizer_round_trips_text(micro_model):
    tok = Tokenizer.from_checkpoint(micro_model)
    text = "The quick brown fox runs to the sea, 1234 times!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)                # merges were learned
    assert tok.eos_token_ids == (EOS_ID,)
