"""A deterministic writer of small Llama-architecture checkpoints in Hugging Face format.

``write_tiny_model(directory)`` writes config.json, generation_config.json, model.safetensors
(or shards with an index), a byte-level BPE tokenizer.json trained on a built-in corpus, and
tokenizer_config.json. The same preset and seed always give the same bytes, so the README's
demo and the tests need no model hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    # the embedded default (also the benchmarks' "tiny")
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    # the benchmarks' "small", about 271M parameters
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    # for fast tests
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2

CORPUS = """\
lamina runs large language models across many small machines. Each node serves a span of
transformer blocks; a client holds the embeddings and the head, and routes hidden states
through a chain of nodes that covers every block. When a node leaves, the client finds
another node for the lost blocks, replays what it sent before, and goes on as if nothing
happened. The quick brown fox jumps over the lazy dog. Once upon a time there was a small
village by the sea, where the people fished in the morning and told stories at night.
The river runs to the sea, and the sea gives the rain back to the hills. In the beginning
the network was small: three machines on a desk, a shared key, and a model too large for
any one of them. Peers find each other through a distributed hash table and share the state
of the swarm by gossip. Every record is signed by the peer that wrote it. Numbers like 0 1
2 3 4 5 6 7 8 9 10 100 1000 and words like hello, world, model, token, layer, cache, block,
span, route, node, client, server, swarm, peer, network, stream, session, message appear.
"""


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    seed: int = 0
    tie_word_embeddings: bool = False


def spec_for(preset: str = "tiny", **overrides) -> TinySpec:
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None
    return replace(TinySpec(**base), **overrides)


def hf_config(spec: TinySpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }


def _weights(spec: TinySpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    d, i, e = spec.hidden_size, spec.intermediate_size, spec.hidden_size // spec.num_attention_heads
    kv = spec.num_key_value_heads * e

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * spec.init_std

    w = {"model.embed_tokens.weight": normal(spec.vocab_size, d)}
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(d)
        w[p + "post_attention_layernorm.weight"] = torch.ones(d)
        w[p + "self_attn.q_proj.weight"] = normal(spec.num_attention_heads * e, d)
        w[p + "self_attn.k_proj.weight"] = normal(kv, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, spec.num_attention_heads * e)
        w[p + "mlp.gate_proj.weight"] = normal(i, d)
        w[p + "mlp.up_proj.weight"] = normal(i, d)
        w[p + "mlp.down_proj.weight"] = normal(d, i)
    w["model.norm.weight"] = torch.ones(d)
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = normal(spec.vocab_size, d)
    return w


def _training_lines(n_words: int = 60000) -> list[str]:
    """The corpus plus seeded pseudo-words, so BPE learns enough merges to fill the vocab."""
    import random

    rng = random.Random(0)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "br", "ch", "st", "th", "tr", "sh", "pl", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                     for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    lines = CORPUS.splitlines()
    lines += [" ".join(words[i:i + 12]) + "." for i in range(0, n_words, 12)]
    return lines


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    # Every id the model can emit decodes: reserve whatever the merges did not fill.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(missing)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 2048}, indent=2) + "\n")


def write_tiny_model(directory: str | os.PathLike, preset: str = "tiny", *,
                     max_shard_bytes: int | None = None, **overrides) -> Path:
    """Write a deterministic random-init Llama checkpoint; returns the directory."""
    from safetensors.torch import save_file

    spec = spec_for(preset, **overrides)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}, indent=2) + "\n")
    (out / "lamina_tiny.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    weights = _weights(spec)
    if max_shard_bytes is None:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        _write_shards(out, weights, max_shard_bytes, save_file)
    write_tokenizer(out, spec.vocab_size)
    return out


def _write_shards(out: Path, weights: dict[str, torch.Tensor], max_bytes: int, save_file) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.nbytes for t in weights.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def ensure_tiny_model(directory: str | os.PathLike, preset: str = "tiny") -> Path:
    """Write the model unless `directory` already holds this preset."""
    out = Path(directory)
    marker = out / "lamina_tiny.json"
    if marker.is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        if json.loads(marker.read_text()) == asdict(spec_for(preset)):
            return out
    return write_tiny_model(out, preset)
