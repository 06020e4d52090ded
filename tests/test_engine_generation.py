"""Cache rollback and batching in the engine; sampling, EOS, streamer; the tiny model writer."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline import (CacheError, GenerationConfig, LocalModelForCausalLM, Segment, Tokenizer,
                      generate, load_client_head, load_span)
from pipeline._generation import (StopStrings, apply_min_p, apply_repetition_penalty, apply_top_k,
                                  apply_top_p, draw_uniform, warp)
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


@pytest.mark.parametrize("options, match", [
    (dict(do_sample=True, temperature=0), "temperature must be > 0 when sampling"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.01), r"min_p must be in \[0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(eos_token_id=[2, -1]), "eos_token_id must be token ids"),
    (dict(pad_token_id=-3), "pad_token_id must be a token id"),
    (dict(stop_strings=[""]), "stop_strings must be non-empty strings"),
    (dict(stop_strings=["\n"]), "stop_strings need a tokenizer"),
])
def test_bad_generation_options(options, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig.build(**options)


def test_generation_options_like_transformers():
    with pytest.raises(TypeError, match="unknown generation option"):
        GenerationConfig.build(num_beams=4)
    assert GenerationConfig.build(temperature=0).temperature == 0          # ignored when greedy
    off = GenerationConfig.build(do_sample=True, top_k=None, top_p=None, min_p=None, temperature=None,
                                 repetition_penalty=None)
    assert (off.top_k, off.top_p, off.min_p, off.temperature, off.repetition_penalty) == (0, 1.0, 0.0, 1.0, 1.0)
    cfg = GenerationConfig.build((7,), "tok", eos_token_id=[3, 4], stop_token_ids=[5], stop_strings="END")
    assert cfg.eos_token_id == (3, 4, 5) and cfg.stop_strings == ("END",) and cfg.tokenizer == "tok"
    assert GenerationConfig.build((7,), eos_token_id=None).eos_token_id == (7,)
    assert GenerationConfig.build((7,), eos_token_id=torch.tensor([1, 2])).eos_token_id == (1, 2)


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import MinPLogitsWarper
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(0, 300, (4, 5), generator=g)
    for p in (0.0, 0.01, 0.1, 0.5, 0.9, 1.0):
        ours, theirs = apply_min_p(logits, p), MinPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(ours, theirs), p
        assert torch.equal(ours.softmax(-1), theirs.softmax(-1))


def test_warpers_in_transformers_order(micro_model):
    """transformers' own generate, sampling with every processor on: its processed scores at each
    step are ours from its raw logits (so the order, temperature -> top-k -> top-p -> min-p after
    the repetition penalty, is HF's)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(micro_model).eval()
    prompt = torch.tensor([[5, 6, 7, 8], [40, 41, 42, 43]])
    opts = dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=6, pad_token_id=0, output_scores=True, output_logits=True,
                          return_dict_in_generate=True, **opts)
    cfg = GenerationConfig.build(**opts)
    for i, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        ours = warp(apply_repetition_penalty(raw, out.sequences[:, :4 + i], 1.2), cfg)
        assert torch.equal(ours.isinf(), processed.isinf())
        assert torch.allclose(ours, processed)
        assert ((~ours.isinf()).sum(-1) < 30).any()            # the filters did filter


def test_seed_reproducible_distinct_and_leaves_the_global_rng_alone(micro):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    opts = dict(max_new_tokens=16, do_sample=True, temperature=5.0, top_k=0, eos_token_id=[])
    state = torch.get_rng_state()
    a, b = micro.generate(ids, seed=1, **opts), micro.generate(ids, seed=1, **opts)
    c = micro.generate(ids, seed=2, **opts)
    d, e = micro.generate(ids, **opts), micro.generate(ids, **opts)      # fresh seeds
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 3:], c[:, 3:]) and not torch.equal(d[:, 3:], e[:, 3:])
    assert not torch.equal(a[0, 3:], a[1, 3:])                           # rows draw their own numbers


def test_sampling_never_picks_a_filtered_token(micro):
    ids = torch.tensor([[5, 6, 7]])
    out = micro.generate(ids, max_new_tokens=24, do_sample=True, temperature=3.0, top_k=3, seed=5, eos_token_id=[])
    logits = micro(out).logits[0, 2:-1]
    allowed = logits.topk(3, dim=-1).indices
    assert all(t in row for t, row in zip(out[0, 3:].tolist(), allowed.tolist()))
    # min_p=1 keeps only the most likely token: sampling is greedy (logits here have no ties)
    sampled = micro.generate(ids, max_new_tokens=12, do_sample=True, min_p=1.0, seed=3, eos_token_id=[])
    assert torch.equal(sampled, micro.generate(ids, max_new_tokens=12, eos_token_id=[]))


def test_eos_list_per_row_like_transformers(micro_model, micro):
    """Two EOS ids, each row stopping at another one and at another step: the finished row is
    padded, the call ends when both are done; transformers' generate gives the same tensor."""
    import transformers

    from conftest import assert_decisive

    ids = torch.tensor([[5, 6, 7], [9, 9, 9]])
    free = assert_decisive(micro, micro.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    a = int(free[0, 3 + 2])
    b = next(t for t in free[1, 3 + 4:].tolist() if t not in free[0, 3:3 + 3].tolist() and t != a)
    out = micro.generate(ids, max_new_tokens=12, eos_token_id=[a, b], pad_token_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(micro_model).eval()
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[a, b], pad_token_id=1)
    assert torch.equal(out, ref)
    assert out.shape[1] < 3 + 12 and (out[0, 3:] == 1).any()


def test_stop_strings_unit(micro):
    """`completed` is true at the token that completes a stop string, and only there (the tokens
    here: 'T','h','e',' ','q','u','i','c','k',' br','ow','n',' f','o','x',',',...)."""
    tok = micro.tokenizer
    ids = tok.encode("The quick brown fox, 1234")
    prefixes = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]

    def done(stop):
        stops = StopStrings([stop, "never"], tok)
        return [i for i in range(len(ids)) if stops.completed(ids[:i + 1])]

    assert done("fox,") == [prefixes.index("The quick brown fox,")]     # over several tokens
    assert done("rown") == [prefixes.index("The quick brown")]
    assert done("b") == [prefixes.index("The quick br")]                # inside one token, text around it
    assert done("dog") == [] and done("e q") == [prefixes.index("The q")]


def _spanning_stop_string(tok, new):
    """A printable stop string over the last two or more tokens of ``new[:k]``, absent from the
    text before; returns it and k."""
    texts = [tok.decode(new[:k], skip_special_tokens=False) for k in range(len(new) + 1)]
    for k in range(3, len(new) + 1):
        last = len(tok.decode(new[k - 1:k], skip_special_tokens=False))
        for n in range(last + 2, len(texts[k]) + 1):
            stop = texts[k][-n:]
            if stop.isprintable() and "\ufffd" not in stop and stop not in texts[k - 1] and \
                    texts[k].startswith(texts[k - 1]):
                return stop, k
    raise AssertionError("no printable stop string in this generation: pick another prompt")


def test_stop_strings_stop_at_the_completing_token(micro):
    """The stop string spans several tokens: generation stops at the first token whose decoded
    text completes it, keeps that token, pads a row that stopped while the other goes on."""
    tok = micro.tokenizer
    ids = torch.tensor([tok.encode("Once upon a time"), tok.encode("hello world. Bye")])   # 13 tokens each
    free = micro.generate(ids, max_new_tokens=20, eos_token_id=[])
    p = ids.shape[1]
    stop, k = _spanning_stop_string(tok, free[0, p:].tolist())
    assert stop not in tok.decode(free[1, p:].tolist(), skip_special_tokens=False)
    out = micro.generate(ids, max_new_tokens=20, eos_token_id=[], stop_strings=[stop, "never"], pad_token_id=0)
    assert out[0, :p + k].tolist() == free[0, :p + k].tolist()       # the completing token is kept
    assert out[0, p + k:].eq(0).all() and torch.equal(out[1], free[1])
    alone = micro.generate(ids[:1], max_new_tokens=20, eos_token_id=[], stop_strings=stop)
    assert torch.equal(alone, free[:1, :p + k])                      # a batch all done ends there
    # the model's tokenizer is the default; another one (here the same) can be passed
    assert torch.equal(micro.generate(ids[:1], max_new_tokens=20, eos_token_id=[], stop_strings=stop,
                                      tokenizer=tok), alone)


SWARM_SEED = 1234


@pytest.mark.slow
def test_seeded_sampling_same_locally_and_through_the_swarm(tiny_model):
    """Same seed, same sampled tokens from a 2-node `run-node` swarm as from the local model.
    Each draw is checked to lie more than 1e-5 from the boundaries of the token it picked, so
    logits that agree to float rounding must pick the same tokens."""
    from pipeline import DistributedModelForCausalLM
    from pipeline.launch import LocalSwarm

    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([[5, 17, 300, 41], [900, 3, 3, 77]])
    opts = dict(max_new_tokens=16, do_sample=True, temperature=1.5, eos_token_id=[], seed=SWARM_SEED, top_k=20)
    expected = local.generate(prompt, **opts)
    g = torch.Generator().manual_seed(SWARM_SEED)
    with torch.no_grad():
        logits = local(expected).logits[:, 3:-1]
    for i in range(16):
        top = logits[:, i].topk(21, dim=-1).values
        assert (top[:, 19] - top[:, 20]).min() > 1e-5, f"step {i}: top-k boundary too close: pick another seed"
        probs = apply_top_k(logits[:, i] / 1.5, 20).softmax(-1).double()
        cdf = probs.cumsum(-1)
        x = draw_uniform(g, 2)[:, 0] * cdf[:, -1]
        tok = expected[:, 4 + i]
        hi = cdf.gather(1, tok[:, None])[:, 0]
        lo = hi - probs.gather(1, tok[:, None])[:, 0]
        assert ((x - lo).min() > 1e-5) and ((hi - x).min() > 1e-5), f"draw {i} too close to a boundary: pick another seed"
    assert not torch.equal(expected, local.generate(prompt, max_new_tokens=16, eos_token_id=[]))
    with LocalSwarm(tiny_model, [(0, 4), (4, 8)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        assert torch.equal(model.generate(prompt, **opts), expected)
        assert torch.equal(model.generate(prompt, streamer=_Null(), **opts), expected)   # loop in this thread


class _Null:
    def put(self, value):
        pass

    def end(self):
        pass


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
