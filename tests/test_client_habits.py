"""Hugging Face habits through a swarm of real `run-node` processes on loopback: the same tokens
as the local model (itself checked against transformers in tests/test_generation_habits.py).

Left-padded batches (each row in a session of its own, the rows' steps concurrent), the
generation options (`max_length`, `min_new_tokens`, `stopping_criteria`, `generation_config`
and the checkpoint's generation_config.json), `torch_dtype`, and `TextIteratorStreamer` with
`generate` in another thread.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import trio

from conftest import assert_decisive
from pipeline import (AsyncDistributedModelForCausalLM, DistributedModelForCausalLM, InvalidInputError,
                      LocalModelForCausalLM, TextIteratorStreamer)
from pipeline.launch import LocalSwarm

pytestmark = pytest.mark.slow  # run-node processes

ROWS = [[5, 17, 300, 41, 9, 8], [900, 3, 3], [42, 43, 44, 45]]


def left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


@pytest.fixture(scope="module")
def swarm(tiny_model):
    with LocalSwarm(tiny_model, [(0, 4), (4, 8)]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def local(tiny_model):
    return LocalModelForCausalLM.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model, swarm):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers,
                                                     torch_dtype="float32") as model:
        yield model


class _Null:
    def put(self, value):
        pass

    def end(self):
        pass


def test_left_padded_batch_through_the_swarm(model, local):
    """Each row's tokens are those it gets alone; with and without a streamer (the loop in
    this thread or on the client's), and the logits of a padded forward."""
    alone = [assert_decisive(local, local.generate(torch.tensor([r]), max_new_tokens=12, eos_token_id=[]), 12)
             for r in ROWS]
    ids, mask = left_padded(ROWS)
    expected = local.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    for row, single in enumerate(alone):
        assert expected[row, -12:].tolist() == single[0, -12:].tolist()
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]), expected)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                                      streamer=_Null()), expected)
    logits = model(ids, attention_mask=mask).logits
    assert (logits - local(ids, attention_mask=mask).logits).abs().max() < 1e-4
    assert model.head.dtype == torch.float32
    with model.inference_session(max_length=64), pytest.raises(InvalidInputError, match="session of its own"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


async def test_left_padded_batch_through_the_async_client(tiny_model, swarm, local):
    ids, mask = left_padded(ROWS)
    expected = local.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    async with AsyncDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as m:
        with trio.fail_after(120):
            assert torch.equal(await m.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]),
                               expected)


def test_generation_options_through_the_swarm(model, local):
    ids = torch.tensor([ROWS[0], ROWS[0][::-1]])
    p = ids.shape[1]
    free = assert_decisive(local, local.generate(ids, max_new_tokens=12, eos_token_id=[]), 12)
    eos = int(free[0, p + 1])

    def stop_after_five(input_ids, scores):
        return input_ids.shape[1] >= p + 5

    for options in (dict(max_length=p + 7), dict(max_length=p + 7, max_new_tokens=4),
                    dict(max_new_tokens=12, min_new_tokens=6, eos_token_id=eos, pad_token_id=0),
                    dict(max_new_tokens=12, stopping_criteria=[stop_after_five]),
                    dict(generation_config=dict(max_new_tokens=6, repetition_penalty=1.3))):
        options.setdefault("eos_token_id", [])
        assert torch.equal(model.generate(ids, **options), local.generate(ids, **options)), options


def test_generation_config_json_is_read_by_the_client(tiny_model, swarm, local, tmp_path):
    """The client reads the checkpoint's generation_config.json (the swarm serves the same
    model: the hash comes from config.json)."""
    ids = torch.tensor([ROWS[0]])
    p = ids.shape[1]
    free = assert_decisive(local, local.generate(ids, max_new_tokens=10, eos_token_id=[]), 10)
    new = free[0, p:].tolist()
    k = next(k for k in range(1, 10) if new[k] not in new[:k])    # a token that first comes at step k
    path = shutil.copytree(tiny_model, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [new[k]], "max_new_tokens": 10}))
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
        assert torch.equal(model.generate(ids), free[:, :p + k + 1])
        assert torch.equal(model.generate(ids, eos_token_id=[]), free)


def test_iterator_streamer_with_generate_in_a_thread(model, local):
    prompt = "Once upon a time"
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=model.generate(ids, streamer=streamer, max_new_tokens=24, eos_token_id=[])))
    thread.start()
    text = "".join(streamer)
    thread.join()
    expected = local.generate(ids, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(result["out"], expected)
    assert text == model.tokenizer.decode(expected[0, ids.shape[1]:])
