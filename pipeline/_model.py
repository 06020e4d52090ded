"""The Llama-family transformer in one file (gpt-fast shape).

Every supported family (Llama 2/3, Mistral, Qwen2, Qwen3) is this one model; the differences are
fields of `ModelConfig` (qkv bias, q/k norm, tied embeddings, sliding window, rope scaling).

A `Span` holds blocks ``[start, end)`` and runs them over one or many *segments*: a segment is
one session's step, ``(hidden [B, T, D], start_position, cache)``. Linear layers and MLPs run
on all segments' tokens at once (that is the batching across sessions a node does); attention
runs per segment against that segment's own `KVCache`. With a single segment this is the plain
``span(hidden, positions, cache)`` call.

Shapes: B batch rows, T new tokens, S cached positions, D hidden, H query heads, K kv heads,
G = H // K, E head_dim, N = sum of B*T over segments (packed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import ModelConfig, rope_inv_freq
from ._errors import CacheError, InvalidInputError, InvalidSpanError


class KVCache:
    """Preallocated keys/values of one session for one span: ``k, v: [L, B, K, S_max, E]``.

    Written at explicit positions. ``length`` is how many positions hold valid entries; a step
    may start at any position <= length (starting earlier rolls back), never past it.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_length: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if batch <= 0 or max_length <= 0:
            raise CacheError(f"cache needs batch >= 1 and max_length >= 1, got {batch}, {max_length}")
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def rollback(self, length: int) -> None:
        """Forget every position >= length."""
        if not 0 <= length <= self.length:
            raise CacheError(f"cannot roll back to {length}: cache holds {self.length} positions")
        self.length = length


@dataclass
class Segment:
    """One session's share of a (possibly batched) step."""

    hidden: Tensor   # [B, T, D]
    start: int       # position of hidden[:, 0]
    cache: KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # As transformers: normalise in float32, cast back, then scale.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.sizes = (q_out, kv_out, kv_out)
        self.wqkv = nn.Linear(c.hidden_size, q_out + 2 * kv_out, bias=c.attention_bias)
        self.wo = nn.Linear(q_out, c.hidden_size, bias=c.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.window = c.sliding_window

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int,
                segments: Sequence[Segment]) -> Tensor:
        n = x.shape[0]
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)     # [N, H, E]
        k = k.view(n, self.n_kv, self.head_dim)        # [N, K, E]
        v = v.view(n, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        outs, offset = [], 0
        groups = self.n_heads // self.n_kv
        for seg in segments:
            b, t = seg.hidden.shape[:2]
            rows = slice(offset, offset + b * t)
            offset += b * t
            end = seg.start + t
            ck, cv = seg.cache.k[layer], seg.cache.v[layer]               # [B, K, S_max, E]
            ck[:, :, seg.start:end] = k[rows].view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            cv[:, :, seg.start:end] = v[rows].view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            keys, values = ck[:, :, :end], cv[:, :, :end]
            mask = _attention_mask(seg.start, t, self.window, x.device)
            if t == 1 and mask is None:
                # Decode: the G query heads sharing a kv head are stacked on the query axis, so
                # grouped-query attention reads the cache without copying it: [B, K, G, E].
                qs = q[rows].view(b, self.n_kv, groups, self.head_dim)
                o = F.scaled_dot_product_attention(qs, keys, values)         # [B, K, G, E]
                outs.append(o.reshape(b, self.n_heads * self.head_dim))
                continue
            qs = q[rows].view(b, t, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, T, E]
            gqa = groups > 1
            if mask is True:
                o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=gqa)
            outs.append(o.transpose(1, 2).reshape(b * t, self.n_heads * self.head_dim))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.wo(out)


def _attention_mask(start: int, t: int, window: int | None, device) -> Tensor | bool | None:
    """None: every cached key is visible; True: plain causal (start == 0); else a [T, S] mask."""
    end = start + t
    windowed = window is not None and end > window
    if not windowed:
        if t == 1:
            return None
        if start == 0:
            return True
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.intermediate = c.intermediate_size
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)   # gate | up
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int,
                segments: Sequence[Segment]) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, layer, segments)
        return h + self.feed_forward(self.ffn_norm(h))


class Rotary:
    """cos/sin tables grown on demand; values equal transformers' (float32 then cast)."""

    def __init__(self, config: ModelConfig, device) -> None:
        self.inv_freq = rope_inv_freq(config).to(device)
        self._cos = self._sin = None
        self._len = 0

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        self._grow(int(positions.max()) + 1, dtype)
        return self._cos[positions][:, None, :], self._sin[positions][:, None, :]   # [N, 1, E]

    def range(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The same for positions start..end-1 in order: views of the tables (no gather)."""
        self._grow(end, dtype)
        return self._cos[start:end, None, :], self._sin[start:end, None, :]

    def _grow(self, need: int, dtype: torch.dtype) -> None:
        if need > self._len or self._cos.dtype != dtype:
            size = max(need, 2 * self._len, 256)
            pos = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin, self._len = emb.cos().to(dtype), emb.sin().to(dtype), size


class Span(nn.Module):
    """Blocks ``[start, end)`` of a model. ``span(hidden, positions, cache) -> hidden``."""

    def __init__(self, config: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not (0 <= start < end <= config.num_hidden_layers):
            raise InvalidSpanError(
                f"span [{start}, {end}) is not a non-empty range inside the model's "
                f"{config.num_hidden_layers} blocks")
        self.config, self.start, self.end = config, start, end
        self.layers = nn.ModuleList(Block(config) for _ in range(end - start))
        self._rotary: Rotary | None = None

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].ffn_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].ffn_norm.weight.device

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache(self.num_layers, batch, c.num_key_value_heads, max_length, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def cache_bytes_per_token(self) -> int:
        c = self.config
        return 2 * self.num_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    @torch.inference_mode()
    def forward(self, hidden: Tensor, positions: Tensor | int, cache: KVCache) -> Tensor:
        """Run one session's step: hidden [B, T, D] at contiguous positions -> hidden [B, T, D]."""
        start = _start_of(positions, hidden.shape[1] if hidden.dim() == 3 else 0)
        return self.forward_segments([Segment(hidden, start, cache)])[0]

    @torch.inference_mode()
    def forward_segments(self, segments: Sequence[Segment]) -> list[Tensor]:
        """Run several sessions' steps as one batched pass; results equal running each alone."""
        if not segments:
            return []
        for seg in segments:
            self._check(seg)
        if self._rotary is None:
            self._rotary = Rotary(self.config, self.device)
        first = segments[0]
        if len(segments) == 1 and first.hidden.shape[0] == 1:  # one row (a decode step): no gather
            cos, sin = self._rotary.range(first.start, first.start + first.hidden.shape[1], first.hidden.dtype)
        else:
            pos = torch.cat([
                torch.arange(s.start, s.start + s.hidden.shape[1], device=self.device).repeat(s.hidden.shape[0])
                for s in segments])
            cos, sin = self._rotary(pos, first.hidden.dtype)  # (_check: every segment is in our dtype)
        x = torch.cat([s.hidden.reshape(-1, self.config.hidden_size) for s in segments]) \
            if len(segments) > 1 else first.hidden.reshape(-1, self.config.hidden_size)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, segments)
        outs, offset = [], 0
        for s in segments:
            b, t = s.hidden.shape[:2]
            outs.append(x[offset:offset + b * t].view(b, t, -1))
            offset += b * t
            s.cache.length = s.start + t
        return outs

    def _check(self, seg: Segment) -> None:
        h, c = seg.hidden, seg.cache
        if h.dim() != 3 or h.shape[2] != self.config.hidden_size:
            raise CacheError(f"hidden states must be [batch, tokens, {self.config.hidden_size}], "
                             f"got {list(h.shape)}")
        if h.dtype != self.dtype:
            raise CacheError(f"hidden states are {h.dtype}, this span computes in {self.dtype}")
        if h.shape[1] == 0:
            raise CacheError("a step needs at least one token")
        if c.num_layers != self.num_layers or c.k.dtype != self.dtype:
            raise CacheError("this cache was not made for this span")
        if h.shape[0] != c.batch:
            raise CacheError(f"batch of {h.shape[0]} rows does not match the session's {c.batch}")
        if not 0 <= seg.start <= c.length:
            raise CacheError(f"step starts at position {seg.start} but the cache holds "
                             f"{c.length}; steps must be contiguous")
        if seg.start + h.shape[1] > c.max_length:
            raise CacheError(f"positions up to {seg.start + h.shape[1]} exceed the session's "
                             f"max_length {c.max_length}")


def _start_of(positions: Tensor | int, t: int) -> int:
    if isinstance(positions, int):
        return positions
    if positions.dim() != 1 or positions.numel() != t:
        raise CacheError(f"positions must be a 1-D tensor of {t} entries")
    start = int(positions[0])
    if t > 1 and not torch.equal(positions, torch.arange(start, start + t, device=positions.device)):
        raise CacheError("positions must be contiguous and increasing")
    return start


class ClientHead(nn.Module):
    """What a client holds: token embeddings, the final norm and the LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # given its weight (loading assigns the real one): nn.Embedding's own initialisation
        # costs a client 1.7 s of CPU at start (it pulls in torch._dynamo), even on "meta"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @torch.inference_mode()
    def embed(self, input_ids: Tensor) -> Tensor:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise InvalidInputError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                                        f"{lo if lo < 0 else hi}")
        return self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden)).float()


# --- Hugging Face weight names -> lamina parameters -----------------------------------------
# Per-block tensors; (lamina name, [hf names fused in order], required)
BLOCK_WEIGHTS = (
    ("attention_norm.weight", ["input_layernorm.weight"], True),
    ("ffn_norm.weight", ["post_attention_layernorm.weight"], True),
    ("attention.wqkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                               "self_attn.v_proj.weight"], True),
    ("attention.wqkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                             "self_attn.v_proj.bias"], False),
    ("attention.wo.weight", ["self_attn.o_proj.weight"], True),
    ("attention.wo.bias", ["self_attn.o_proj.bias"], False),
    ("attention.q_norm.weight", ["self_attn.q_norm.weight"], False),
    ("attention.k_norm.weight", ["self_attn.k_norm.weight"], False),
    ("feed_forward.w13.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], True),
    ("feed_forward.w13.bias", ["mlp.gate_proj.bias", "mlp.up_proj.bias"], False),
    ("feed_forward.w2.weight", ["mlp.down_proj.weight"], True),
    ("feed_forward.w2.bias", ["mlp.down_proj.bias"], False),
)
HEAD_WEIGHTS = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)


def hf_block_names(config: ModelConfig, layer: int) -> list[str]:
    """The checkpoint tensor names block `layer` needs."""
    names = []
    for ours, theirs, required in BLOCK_WEIGHTS:
        if required or _wanted(config, ours):
            names += [f"model.layers.{layer}.{n}" for n in theirs]
    return names


def _wanted(config: ModelConfig, ours: str) -> bool:
    if ours == "attention.wqkv.bias":
        return config.attention_bias
    if ours == "attention.wo.bias":
        return config.o_proj_bias
    if ours.startswith("feed_forward") and ours.endswith(".bias"):
        return config.mlp_bias
    if ours.startswith(("attention.q_norm", "attention.k_norm")):
        return config.qk_norm
    return True
