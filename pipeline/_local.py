"""A whole model on this machine: the reference the distributed client is checked against."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ._checkpoint import Checkpoint, load_client_head, load_span
from ._errors import InvalidOptionError, UnknownOptionError
from ._generation import GenerationConfig, Streamer, generate
from ._genconfig import read_generation_config
from ._inputs import Padding, as_batch
from ._model import Segment
from ._streamers import telling
from ._tokenizer import Tokenizer


@dataclass
class CausalLMOutput:
    logits: Tensor   # [B, T, vocab], float32


def pick_dtype(dtype: Any, torch_dtype: Any) -> Any:
    """`from_pretrained`'s dtype: ``dtype`` or its transformers name ``torch_dtype`` (not two
    different ones); "auto" (the checkpoint's) when neither is given."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise InvalidOptionError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: "
                                 f"torch_dtype is transformers' name for dtype, give one of them")
    chosen = dtype if dtype is not None else torch_dtype
    return "auto" if chosen is None else chosen


def refuse_options(options: dict[str, Any], what: str) -> None:
    if options:
        raise UnknownOptionError(f"unknown option(s) for {what}: {', '.join(sorted(options))}")


class LocalModelForCausalLM:
    """Client head + every block in one process; HF-style `__call__` and `generate`."""

    def __init__(self, checkpoint: Checkpoint, device="cpu", dtype="auto") -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.head = load_client_head(checkpoint, device, dtype)
        self.span = load_span(checkpoint, 0, self.config.num_hidden_layers, device, dtype)
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint.path)
        self.generation_defaults = read_generation_config(checkpoint)   # generation_config.json

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device="cpu", dtype=None, torch_dtype=None,
                        **options: Any) -> "LocalModelForCausalLM":
        """`dtype` (or `torch_dtype`, transformers' name): "auto" (the checkpoint's), float32,
        bfloat16, float16 or a torch dtype."""
        refuse_options(options, "LocalModelForCausalLM.from_pretrained")
        return cls(Checkpoint(name_or_path), device, pick_dtype(dtype, torch_dtype))

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalLMOutput:
        ids = as_batch(input_ids)
        padding = Padding.of(attention_mask, ids, generating=False)
        hidden = self.head.embed(ids)
        if padding is None:
            out = self.span(hidden, 0, self.span.new_cache(ids.shape[0], ids.shape[1]))
            return CausalLMOutput(self.head.logits(out))
        step = self._padded_step(padding, padding.lengths)
        return CausalLMOutput(padding.mask_logits(self.head.logits(step(hidden, 0)).clone()))

    def generate(self, input_ids: Tensor | None = None, streamer: Streamer | None = None,
                 attention_mask: Tensor | None = None, **options: Any) -> Tensor:
        """HF-style generate (see `pipeline._generation`); a left-padded batch with its
        `attention_mask` gives each row the tokens it gets alone."""
        with telling(streamer):
            ids = as_batch(options.pop("inputs", None) if input_ids is None else input_ids)
            cfg = GenerationConfig.build(self.config.eos_token_ids, self.tokenizer, prompt_length=ids.shape[1],
                                         model_defaults=self.generation_defaults, **options)
            padding = Padding.of(attention_mask, ids, generating=True)
            if padding is None:
                cache = self.span.new_cache(ids.shape[0], ids.shape[1] + cfg.max_new_tokens)
                return generate(lambda h, start: self.span(h, start, cache), self.head, ids, cfg, streamer)
            step = self._padded_step(padding, [n + cfg.max_new_tokens for n in padding.lengths])
            return generate(step, self.head, ids, cfg, streamer)

    def _padded_step(self, padding: Padding, lengths):
        """A step over a padded batch: each row with a cache of its own, all rows in one pass
        (`Span.forward_segments`)."""
        caches = [self.span.new_cache(1, n) for n in lengths]

        def step(hidden: Tensor, position: int) -> Tensor:
            rows = padding.split(hidden, position)
            outs = self.span.forward_segments([Segment(h, p, c) for (h, p), c in zip(rows, caches)])
            return padding.merge(outs, hidden, position)

        return step

    def chat(self, messages, max_new_tokens: int = 256, streamer=None, **options) -> str:
        """The assistant's reply to `messages` through the model's chat template; see
        `pipeline._chat.chat` (`streamer(text)` gets text chunks as they come)."""
        from ._chat import chat

        return chat(self, messages, max_new_tokens=max_new_tokens, streamer=streamer, **options)
