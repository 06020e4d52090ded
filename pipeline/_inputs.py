"""What a call's inputs are: token ids as a batch, and the rows of a padded batch.

A batch of prompts of different lengths comes padded, with an ``attention_mask`` that is 0 on
the padding (what a transformers tokenizer gives with ``padding=True``). lamina's blocks take
no mask (a node runs a session's rows at the same positions), so each row of a padded batch
runs as a sequence of its own: its own cache (local) or session (through the swarm), its own
positions from 0, without its padding. Each row's tokens are then those of the row alone,
bit for bit where it runs alone, which is what transformers' masked attention computes too.
The rows still run together: one batched pass over segments locally, concurrent sessions
whose steps the nodes batch through the swarm; generation (sampling draws, stop rules,
streamer) sees one batch as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._errors import CacheError, InvalidInputError


def as_batch(input_ids: Any, what: str = "input_ids") -> Tensor:
    """`input_ids` as a [batch, tokens] int64 tensor of at least one token (a list, a 1-D or a
    2-D integer tensor)."""
    if not isinstance(input_ids, Tensor):
        try:
            input_ids = torch.tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidInputError(f"{what} must be token ids (a tensor or a list of ints), got "
                                    f"{type(input_ids).__name__}: {e}") from None
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InvalidInputError(f"{what} must be integer token ids, got a {input_ids.dtype} tensor")
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InvalidInputError(f"{what} must be [batch, tokens] with at least one token, got {list(ids.shape)}")
    return ids.long()


@dataclass(frozen=True)
class Padding:
    """The rows of a padded batch: row i holds columns ``[starts[i], ends[i])`` of the prompt
    (left padding: every row ends at `width`; right padding, for a forward pass only: every
    row starts at 0). Generated tokens follow column `width` in every row."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    width: int

    @classmethod
    def of(cls, attention_mask: Any, input_ids: Tensor, *, generating: bool) -> "Padding | None":
        """The padding `attention_mask` describes for `input_ids` [B, T]; None without a mask or
        with one that is all ones. Raises `InvalidInputError` for a mask lamina cannot honour."""
        if attention_mask is None:
            return None
        mask = as_batch(attention_mask, "attention_mask")
        if mask.shape != input_ids.shape:
            raise InvalidInputError(f"attention_mask has shape {list(mask.shape)}, input_ids "
                                    f"{list(input_ids.shape)}: they must match")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidInputError("attention_mask must hold only 0 (padding) and 1 (a token)")
        if bool(mask.all()):
            return None
        lengths = mask.sum(dim=1)
        starts = mask.argmax(dim=1)                       # the first 1 of each row
        if bool((lengths == 0).any()):
            raise InvalidInputError(f"row {int((lengths == 0).nonzero()[0])} of attention_mask is all padding")
        cols = torch.arange(mask.shape[1])
        inside = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
        if not torch.equal(inside, mask.bool()):
            raise InvalidInputError("attention_mask must mark one run of tokens per row, with padding only "
                                    "before it (left padding) or after it (right padding)")
        ends = starts + lengths
        width = mask.shape[1]
        if generating and bool((ends != width).any()):
            raise InvalidInputError("generate needs left padding (new tokens follow each row's last "
                                    "column): set the tokenizer's padding_side to 'left'")
        if bool((starts != 0).any()) and bool((ends != width).any()):
            raise InvalidInputError("attention_mask pads some rows on the left and others on the right; "
                                    "pad every row on the same side")
        return cls(tuple(starts.tolist()), tuple(ends.tolist()), width)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in zip(self.starts, self.ends))

    def split(self, hidden: Tensor, position: int) -> list[tuple[Tensor, int]]:
        """Row i's part of a step over `hidden` [B, T, D] at padded `position`, and the row's
        own position: the prompt without its padding at 0, later tokens after the row's own."""
        if position == 0 and hidden.shape[1] == self.width:
            return [(hidden[i:i + 1, s:e], 0) for i, (s, e) in enumerate(zip(self.starts, self.ends))]
        if position >= self.width and all(e == self.width for e in self.ends):
            return [(hidden[i:i + 1], position - s) for i, s in enumerate(self.starts)]
        raise CacheError(f"a padded batch runs its whole prompt first, then the tokens after it; "
                         f"got {hidden.shape[1]} tokens at position {position}")

    def merge(self, outs: list[Tensor], hidden: Tensor, position: int) -> Tensor:
        """The rows' outputs back in the batch's layout; padding positions are zeros."""
        merged = outs[0].new_zeros((hidden.shape[0], hidden.shape[1], outs[0].shape[-1]))
        prompt = position == 0 and hidden.shape[1] == self.width
        for i, out in enumerate(outs):
            if prompt:
                merged[i, self.starts[i]:self.ends[i]] = out[0]
            else:
                merged[i] = out[0]
        return merged

    def mask_logits(self, logits: Tensor) -> Tensor:
        """Prompt logits [B, width, V] with zeros at the padding (no token was computed there)."""
        for i, (s, e) in enumerate(zip(self.starts, self.ends)):
            logits[i, :s] = 0
            logits[i, e:] = 0
        return logits
