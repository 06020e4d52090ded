"""A whole model on this machine: the reference the distributed client is checked against."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor

from ._checkpoint import Checkpoint, load_client_head, load_span
from ._generation import GenerationConfig, Streamer, generate
from ._tokenizer import Tokenizer


@dataclass
class CausalLMOutput:
    logits: Tensor   # [B, T, vocab], float32


class LocalModelForCausalLM:
    """Client head + every block in one process; HF-style `__call__` and `generate`."""

    def __init__(self, checkpoint: Checkpoint, device="cpu", dtype="auto") -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.head = load_client_head(checkpoint, device, dtype)
        self.span = load_span(checkpoint, 0, self.config.num_hidden_layers, device, dtype)
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint.path)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device="cpu", dtype="auto"):
        return cls(Checkpoint(name_or_path), device, dtype)

    def __call__(self, input_ids: Tensor) -> CausalLMOutput:
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        cache = self.span.new_cache(ids.shape[0], ids.shape[1])
        hidden = self.span(self.head.embed(ids), 0, cache)
        return CausalLMOutput(self.head.logits(hidden))

    def generate(self, input_ids: Tensor, streamer: Streamer | None = None, **options) -> Tensor:
        cfg = GenerationConfig.build(self.config.eos_token_ids, self.tokenizer, **options)
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        cache = self.span.new_cache(ids.shape[0], ids.shape[1] + cfg.max_new_tokens)
        return generate(lambda h, start: self.span(h, start, cache), self.head, ids, cfg, streamer)

    def chat(self, messages, max_new_tokens: int = 256, streamer=None, **options) -> str:
        """The assistant's reply to `messages` through the model's chat template; see
        `pipeline._chat.chat` (`streamer(text)` gets text chunks as they come)."""
        from ._chat import chat

        return chat(self, messages, max_new_tokens=max_new_tokens, streamer=streamer, **options)
