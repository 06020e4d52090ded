"""Checkpoint loading: sharded reads touch only needed shards; bad input gives clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import pipeline._checkpoint as ckpt_mod
from pipeline import (CheckpointNotFoundError, InvalidSpanError, ModelLoadError,
                      UnsupportedDtypeError, UnsupportedModelError, check_device, load_client_head,
                      load_config, load_span, resolve_checkpoint)
from pipeline.tiny import write_tiny_model

LAYER_BYTES = 64 * 64 * 4 * 2 + 64 * 32 * 4 * 2 + 64 * 128 * 4 * 3 + 64 * 4 * 2   # micro block


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # one block (plus change) per shard: 8 blocks -> about 10 shards
    return write_tiny_model(tmp_path_factory.mktemp("sharded"), "micro", num_hidden_layers=8,
                            max_shard_bytes=LAYER_BYTES)


def test_span_reads_only_the_shards_holding_its_blocks(sharded, monkeypatch):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for name, f in index.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    assert len(set(index.values())) >= 8 and len(needed) <= 3
    opened = []
    real = ckpt_mod.safe_open

    def spy(path, *a, **kw):
        opened.append(path.rsplit("/", 1)[-1])
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "safe_open", spy)
    span = load_span(sharded, 2, 4)
    assert set(opened) == needed
    assert sorted(span.load_report.files) == sorted(needed)
    wanted_bytes = sum(t.nbytes for layer in span.layers for t in layer.state_dict().values())
    assert span.load_report.bytes_read == wanted_bytes


def test_client_head_reads_no_block_tensors(sharded):
    head = load_client_head(sharded)
    assert head.load_report.tensors == 3
    assert head.load_report.bytes_read == sum(t.nbytes for t in head.state_dict().values())


def test_sharded_and_single_file_give_identical_spans(sharded, tmp_path):
    single = write_tiny_model(tmp_path / "single", "micro", num_hidden_layers=8)
    a, b = load_span(sharded, 2, 4), load_span(single, 2, 4)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_dtype_auto_is_the_checkpoint_dtype_and_conversion_works(micro_model):
    assert load_span(micro_model, 0, 1).dtype == torch.float32
    assert load_span(micro_model, 0, 1, dtype="bfloat16").dtype == torch.bfloat16
    assert load_client_head(micro_model, dtype="float16").dtype == torch.float16


def test_unsupported_architecture_names_the_supported_ones(tmp_path, micro_model):
    shutil.copytree(micro_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_span(tmp_path / "m", 0, 1)
    msg = str(e.value)
    assert "'gpt2'" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_unsupported_rope_type_is_a_clear_error(tmp_path, micro_model):
    shutil.copytree(micro_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_config(tmp_path / "m")


def test_missing_shard_is_named(sharded, tmp_path):
    copy = shutil.copytree(sharded, tmp_path / "m")
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    victim = index["model.layers.3.mlp.down_proj.weight"]
    (copy / victim).unlink()
    load_span(copy, 0, 2)                      # spans not touching the shard still load
    with pytest.raises(ModelLoadError, match=victim):
        load_span(copy, 2, 4)


def test_span_out_of_range(micro_model):
    for start, end in [(0, 5), (-1, 2), (3, 3), (2, 1)]:
        with pytest.raises(InvalidSpanError, match=r"inside the model's 4 blocks"):
            load_span(micro_model, start, end)


def test_dtype_and_device_errors(micro_model):
    with pytest.raises(UnsupportedDtypeError, match="unknown dtype 'float8'"):
        load_span(micro_model, 0, 1, dtype="float8")
    with pytest.raises(UnsupportedDtypeError, match="cannot compute in torch.float8_e4m3fn"):
        check_device("cpu", torch.float8_e4m3fn)
    with pytest.raises(UnsupportedDtypeError, match="unknown device"):
        load_span(micro_model, 0, 1, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedDtypeError, match="no CUDA GPU"):
            load_span(micro_model, 0, 1, device="cuda", dtype="float16")


def test_missing_checkpoint_and_hub_cache(tmp_path, monkeypatch, micro_model):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor"):
        resolve_checkpoint("some-org/some-model")
    snap = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "abc123"
    shutil.copytree(micro_model, snap)
    (tmp_path / "hub" / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    assert resolve_checkpoint("some-org/some-model") == snap
    assert load_span("some-org/some-model", 0, 1).num_layers == 1


def test_cli_reports_bad_input_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--model", str(tmp_path / "nope"),
                        "--local", "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr
