"""Generation as small functions over any ``step(hidden, start) -> hidden`` callable.

The callable runs every transformer block: a local `Span` with its cache, or a remote chain of
nodes. The client head (embeddings, norm, LM head) stays here, so local and distributed
generation share this code and the local model checks the remote chain in tests.

Semantics follow Hugging Face ``generate``: processors in the order repetition penalty,
temperature, top-k, top-p; finished rows are padded with ``pad_token_id`` (EOS when unset); a
streamer gets the prompt first, then each new token, then ``end()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, Iterable, Protocol

import torch
from torch import Tensor

from ._model import ClientHead

StepFn = Callable[[Tensor, int], Tensor]   # (hidden [B, T, D], start position) -> hidden [B, T, D]


class Streamer(Protocol):
    def put(self, value: Tensor) -> None: ...
    def end(self) -> None: ...


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def build(cls, defaults_eos: Iterable[int] = (), **kwargs: Any) -> "GenerationConfig":
        """From HF-style keyword arguments; eos may be an int, a list, or None (model default)."""
        eos = kwargs.pop("eos_token_id", None)
        stop = kwargs.pop("stop_token_ids", None) or ()
        if eos is None:
            eos = tuple(defaults_eos)
        elif isinstance(eos, int):
            eos = (eos,)
        kwargs["eos_token_id"] = tuple(int(e) for e in (*eos, *stop))
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)


def apply_repetition_penalty(logits: Tensor, ids: Tensor, penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, ids, score)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False                       # always keep the most likely token
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def next_tokens(logits: Tensor, ids: Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None) -> Tensor:
    """Pick the next token per row from last-position logits [B, V]."""
    logits = apply_repetition_penalty(logits, ids, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    logits = apply_top_p(apply_top_k(logits, cfg.top_k), cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generation_loop(head: ClientHead, input_ids: Tensor, cfg: GenerationConfig,
                    streamer: Streamer | None = None, start: int = 0
                    ) -> Generator[tuple[Tensor, int], Tensor, Tensor]:
    """The generation algorithm as a generator: it yields ``(hidden, position)`` for the
    blocks to run and is sent back their output; it returns prompt + new tokens. `generate` and
    `agenerate` drive it with a sync or an async step. `start` > 0 continues a session whose
    caches already hold `start` positions."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, "
                         f"got {list(input_ids.shape)}")
    input_ids = input_ids.long().cpu()
    generator = None
    if cfg.do_sample:
        generator = torch.Generator()
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
    if streamer is not None:
        streamer.put(input_ids)
    ids = input_ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    pos = start
    new_hidden = head.embed(input_ids)
    for _ in range(cfg.max_new_tokens):
        out = yield new_hidden, pos
        pos += new_hidden.shape[1]
        logits = head.logits(out[:, -1]).cpu()
        token = next_tokens(logits, ids, cfg, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token)
        if eos.numel():
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
        new_hidden = head.embed(token[:, None])
    if streamer is not None:
        streamer.end()
    return ids


def generate(step: StepFn, head: ClientHead, input_ids: Tensor, cfg: GenerationConfig,
             streamer: Streamer | None = None, start: int = 0) -> Tensor:
    """Prefill `input_ids` at position `start` then decode; returns prompt + new tokens."""
    loop = generation_loop(head, input_ids, cfg, streamer, start)
    try:
        request = next(loop)
        while True:
            request = loop.send(step(*request))
    except StopIteration as done:
        return done.value


async def agenerate(step: Callable[[Tensor, int], Awaitable[Tensor]], head: ClientHead,
                    input_ids: Tensor, cfg: GenerationConfig, streamer: Streamer | None = None,
                    start: int = 0) -> Tensor:
    """`generate` with an async step (a remote chain)."""
    loop = generation_loop(head, input_ids, cfg, streamer, start)
    try:
        request = next(loop)
        while True:
            request = loop.send(await step(*request))
    except StopIteration as done:
        return done.value
