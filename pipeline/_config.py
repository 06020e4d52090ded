"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers every supported family; the differences between families are plain fields
(qkv bias, q/k norm, tied embeddings, sliding window, rope scaling), so the model file has no
per-family branches.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ._errors import UnsupportedModelError, ConfigError

# model_type -> (architecture class name, qkv bias default, q/k norm)
FAMILIES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, False),
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}
SUPPORTED_ARCHITECTURES = tuple(arch for arch, _, _ in FAMILIES.values())
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    attention_bias: bool = False     # q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope.type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {self.rope.type!r} is not supported; "
                              f"supported: {', '.join(ROPE_TYPES)}")

    @property
    def architecture(self) -> str:
        return FAMILIES[self.model_type][0]

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that changes the model's math: two checkpoints with the
        same fingerprint can serve each other's sessions."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json`` (transformers 4.x or 5.x)."""
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type not in FAMILIES:
            by_arch = {arch: mt for mt, (arch, _, _) in FAMILIES.items()}
            known = [by_arch[a] for a in archs if a in by_arch]
            if not known:
                name = model_type or (archs[0] if archs else "unknown")
                raise UnsupportedModelError(
                    f"architecture {name!r} is not supported; lamina supports "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(FAMILIES)})")
            model_type = known[0]
        _, bias_default, qk_norm = FAMILIES[model_type]
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            head_dim = raw.get("head_dim") or hidden // heads
            sliding = None
            if model_type == "mistral":
                sliding = raw.get("sliding_window")
            elif raw.get("use_sliding_window"):
                sliding = raw.get("sliding_window")
                layer_types = raw.get("layer_types") or []
                if layer_types and any(t != "sliding_attention" for t in layer_types):
                    raise UnsupportedModelError(
                        "models mixing sliding and full attention layers are not supported yet")
            partial = raw.get("partial_rotary_factor", 1.0)
            if partial != 1.0:
                raise UnsupportedModelError("partial_rotary_factor != 1.0 is not supported")
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_rope_from_hf(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                attention_bias=bool(raw.get("attention_bias", bias_default)),
                # Qwen2 biases q/k/v only; Llama and Qwen3 bias o_proj too when attention_bias.
                o_proj_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=qk_norm,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                pad_token_id=raw.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x writes `rope_theta`
    # and an optional `rope_scaling` dict.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))),
    )


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies exactly as transformers computes them (float32)."""
    import torch

    rope = config.rope
    dim = config.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq
