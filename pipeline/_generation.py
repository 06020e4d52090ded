"""Generation as small functions over any ``step(hidden, start) -> hidden`` callable.

The callable runs every transformer block: a local `Span` with its cache, or a remote chain of
nodes. The client head (embeddings, norm, LM head) stays here, so local and distributed
generation share this code and the local model checks the remote chain in tests.

Semantics follow Hugging Face ``generate``: the repetition penalty, then (sampling only) the
warpers in HF's order temperature, top-k, top-p, min-p; eos ids are suppressed until
``min_new_tokens`` new tokens (HF's MinNewTokensLengthLogitsProcessor); finished rows (an EOS
token, a stop string completed, a stopping criterion true) are padded with ``pad_token_id``
(the first EOS id when unset); a streamer gets the prompt first, then each new token, then
``end()``. ``max_length`` counts the prompt, ``max_new_tokens`` only the new tokens (and wins
when both are given).

Sampling draws from a per-call `torch.Generator` seeded with `seed` (a fresh random seed when
unset; the global RNG is never touched) by inverse CDF: one uniform number per row and step, the
token whose cumulative probability first exceeds it. The draw is plain arithmetic on the
logits, so a seed gives the same tokens locally and through a swarm, on any machine whose
logits agree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Generator, Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ._errors import InvalidOptionError, SpotCheckError
from ._genconfig import check_options, known_options, merge, options_of
from ._inputs import as_batch
from ._model import ClientHead

StepFn = Callable[[Tensor, int], Tensor]   # (hidden [B, T, D], start position) -> hidden [B, T, D]


class Streamer(Protocol):
    def put(self, value: Tensor) -> None: ...
    def end(self) -> None: ...


class TextDecoder(Protocol):
    """What stop strings need of a tokenizer (lamina's `Tokenizer` or a transformers one)."""
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


# (input_ids [B, T], scores [B, V]) -> bool, or a bool tensor [B]: transformers' StoppingCriteria
StoppingCriterion = Callable[[Tensor, Tensor], Any]

# an option passed as None means what it means to transformers: that processor is off
_NONE_MEANS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                   do_sample=False, stop_strings=(), min_new_tokens=0, stopping_criteria=())


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0              # eos ids are suppressed until this many new tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stopping_criteria: tuple[StoppingCriterion, ...] = field(default=(), compare=False, repr=False)
    tokenizer: TextDecoder | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise InvalidOptionError(f"{name} must be a number, got {value!r}")
            return value

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise InvalidOptionError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise InvalidOptionError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not all(callable(c) for c in self.stopping_criteria):
            raise InvalidOptionError("stopping_criteria must be callables (input_ids, scores) -> bool "
                                     "or a bool tensor per row, as transformers' StoppingCriteria")
        if not isinstance(self.do_sample, bool):
            raise InvalidOptionError(f"do_sample must be True or False, got {self.do_sample!r}")
        temperature = number("temperature")
        if self.do_sample and not 0 < temperature < math.inf:
            raise InvalidOptionError(f"temperature must be > 0 when sampling (do_sample=True), got "
                                     f"{temperature}; greedy decoding is do_sample=False")
        if temperature < 0:
            raise InvalidOptionError(f"temperature must be >= 0, got {temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidOptionError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0 < number("top_p") <= 1:
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise InvalidOptionError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < number("repetition_penalty") < math.inf:
            raise InvalidOptionError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not all(_is_int(e) and e >= 0 for e in self.eos_token_id):
            raise InvalidOptionError(f"eos_token_id must be token ids (integers >= 0), got {self.eos_token_id!r}")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise InvalidOptionError(f"pad_token_id must be a token id (an integer >= 0), got {self.pad_token_id!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidOptionError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise InvalidOptionError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.stop_strings and self.tokenizer is None:
            raise InvalidOptionError("stop_strings need a tokenizer to decode the new tokens: pass "
                                     "tokenizer=..., or use a model whose checkpoint has one")

    @classmethod
    def build(cls, defaults_eos: Iterable[int] = (), default_tokenizer: TextDecoder | None = None, *,
              model_defaults: Mapping[str, Any] | None = None, prompt_length: int = 0,
              **kwargs: Any) -> "GenerationConfig":
        """From HF-style keyword arguments over the model's defaults (its generation_config.json,
        see `pipeline._genconfig`) and a ``generation_config=`` argument. eos may be an int, a
        list, or None (model default); `stop_strings` a string or a list of them;
        `stopping_criteria` a callable or a list of them; another option given as None is off
        (as in transformers: ``top_k=None`` does no top-k); `tokenizer` decodes for stop
        strings (the model's own when not given); ``max_length`` counts the `prompt_length`
        tokens of the prompt."""
        known = known_options(cls.__dataclass_fields__)
        layers = [dict(model_defaults or {}), options_of(kwargs.pop("generation_config", None), known),
                  check_options(kwargs, known)]
        kwargs = merge(layers)
        eos = kwargs.pop("eos_token_id", None)
        stop = kwargs.pop("stop_token_ids", None) or ()
        if eos is None:
            eos = tuple(defaults_eos)
        elif _is_int(eos):
            eos = (eos,)
        elif isinstance(eos, Tensor):
            eos = tuple(eos.flatten().tolist())
        if _is_int(stop):
            stop = (stop,)
        kwargs["eos_token_id"] = tuple(int(e) if _is_int(e) else e for e in (*eos, *stop))
        for name, off in _NONE_MEANS.items():
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = off
        _lengths(kwargs, prompt_length)
        strings = kwargs.get("stop_strings", ())
        kwargs["stop_strings"] = (strings,) if isinstance(strings, str) else tuple(strings)
        criteria = kwargs.get("stopping_criteria", ())
        kwargs["stopping_criteria"] = (criteria,) if callable(criteria) else tuple(criteria)
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = default_tokenizer
        return cls(**kwargs)


def _lengths(options: dict[str, Any], prompt_length: int) -> None:
    """``max_length`` / ``min_length`` (prompt included) as ``max_new_tokens`` /
    ``min_new_tokens``, in place; ``max_new_tokens`` wins over ``max_length`` as in transformers."""
    total = options.pop("max_length", None)
    if options.get("max_new_tokens") is None:
        options.pop("max_new_tokens", None)
        if total is not None:
            if not _is_int(total) or total < 1:
                raise InvalidOptionError(f"max_length must be an integer >= 1, got {total!r}")
            if total <= prompt_length:
                raise InvalidOptionError(f"max_length {total} leaves no room for new tokens after the "
                                         f"{prompt_length}-token prompt (max_length counts the prompt; "
                                         f"max_new_tokens counts only new tokens)")
            options["max_new_tokens"] = total - prompt_length
    least = options.pop("min_length", None)
    if least is not None:
        if not _is_int(least) or least < 0:
            raise InvalidOptionError(f"min_length must be an integer >= 0, got {least!r}")
        fewest = options.get("min_new_tokens", 0)
        if _is_int(fewest):       # (another value: __post_init__ says what is wrong with it)
            options["min_new_tokens"] = max(fewest, least - prompt_length)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def apply_min_p(logits: Tensor, p: float) -> Tensor:
    """Drop the tokens less likely than `p` times the most likely one (HF's MinPLogitsWarper)."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)   # always keep the most likely token
    return logits.masked_fill(remove, float("-inf"))


def warp(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """The sampling warpers in HF's order: temperature, top-k, top-p, min-p."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    return apply_min_p(apply_top_p(apply_top_k(logits, cfg.top_k), cfg.top_p), cfg.min_p)


def new_generator(seed: int | None) -> torch.Generator:
    """A generator of its own for one call: `seed`, or a fresh random seed (not the global RNG)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def draw_uniform(generator: torch.Generator, rows: int) -> Tensor:
    """The one uniform number in [0, 1) per row that a sampling step uses."""
    return torch.rand(rows, 1, generator=generator, dtype=torch.float64)


def sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: per row, the first token whose cumulative probability exceeds
    ``u * total``; never a token of probability 0."""
    cdf = probs.double().cumsum(dim=-1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(dim=-1)   # last token with p > 0
    return torch.minimum(token, last)


def next_tokens(logits: Tensor, ids: Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None) -> Tensor:
    """Pick the next token per row from last-position logits [B, V]."""
    logits = apply_repetition_penalty(logits, ids, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    if generator is None:
        generator = new_generator(cfg.seed)
    probs = warp(logits, cfg).softmax(dim=-1)
    return sample(probs, draw_uniform(generator, probs.shape[0]))


class StopStrings:
    """Per row: has the decoded text of the new tokens come to contain a stop string? Checked
    after each token, so the token that completes one is the row's last (it is kept, as in
    transformers). Only a window of the last tokens is decoded: a stop string of n UTF-8 bytes
    lies within the last n tokens that decode to text, and a few more absorb a character split
    across tokens at the window's start."""

    def __init__(self, strings: Sequence[str], tokenizer: TextDecoder) -> None:
        self.strings, self.tokenizer = tuple(strings), tokenizer
        self.window = max(len(s.encode()) for s in self.strings) + 4

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def completed(self, new: Sequence[int]) -> bool:
        """Whether the last of the `new` tokens completes a stop string."""
        window = list(new[-self.window:])
        text, before = self._decode(window), self._decode(window[:-1])
        changed = len(os.path.commonprefix([text, before]))   # text from here on is the last token's
        return any(text.find(s, max(0, changed - len(s) + 1)) >= 0 for s in self.strings)


def criterion_rows(result: Any, rows: int) -> Tensor:
    """A stopping criterion's answer (a bool, or a bool tensor with one value per row, as
    transformers' StoppingCriteria return) as a bool tensor [rows]."""
    try:
        done = torch.as_tensor(result, dtype=torch.bool).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        done = None
    if done is None or done.numel() not in (1, rows):
        raise InvalidOptionError(f"a stopping criterion must return a bool or a bool tensor of {rows} "
                                 f"row(s), got {result!r}")
    return done.expand(rows) if done.numel() == 1 else done


def generation_loop(head: ClientHead, input_ids: Tensor, cfg: GenerationConfig,
                    streamer: Streamer | None = None, start: int = 0
                    ) -> Generator[tuple[Tensor, int], Tensor, Tensor]:
    """The generation algorithm as a generator: it yields ``(hidden, position)`` for the
    blocks to run and is sent back their output; it returns prompt + new tokens. `generate` and
    `agenerate` drive it with a sync or an async step. `start` > 0 continues a session whose
    caches already hold `start` positions."""
    input_ids = as_batch(input_ids).cpu()
    generator = new_generator(cfg.seed) if cfg.do_sample else None
    stops = StopStrings(cfg.stop_strings, cfg.tokenizer) if cfg.stop_strings else None
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long)
    suppressed = eos[eos < head.config.vocab_size]    # until min_new_tokens (an id past the vocab never comes)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
    if streamer is not None:
        streamer.put(input_ids)
    ids = input_ids
    prompt_len = ids.shape[1]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    pos = start
    new_hidden = head.embed(input_ids)
    for made in range(cfg.max_new_tokens):
        out = yield new_hidden, pos
        pos += new_hidden.shape[1]
        logits = head.logits(out[:, -1]).cpu()
        if made < cfg.min_new_tokens:
            logits = logits.index_fill(1, suppressed, float("-inf"))
        token = next_tokens(logits, ids, cfg, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token)
        if eos.numel():
            finished |= torch.isin(token, eos)
        if stops is not None:
            for row in (~finished).nonzero().flatten().tolist():
                finished[row] = stops.completed(ids[row, prompt_len:].tolist())
        for criterion in cfg.stopping_criteria:
            finished |= criterion_rows(criterion(ids, logits), ids.shape[0])
        if bool(finished.all()):
            break
        new_hidden = head.embed(token[:, None])
    if streamer is not None:
        streamer.end()
    return ids


MAX_REDOS = 4  # generations started again (a spot check found a faulty node each time)


class Redo(Exception):
    """Raised by a step: the outputs of the steps from `position` on were wrong (a node a spot
    check caught, now routed around), so the tokens chosen since must be chosen again. The
    drivers below start the generation again from its prompt. Internal to the client."""

    def __init__(self, position: int, peer: str) -> None:
        super().__init__(f"outputs from position {position} on came from faulty node {peer}")
        self.position = position
        self.peer = peer


class _Shown:
    """A streamer across restarts: what it was shown is not shown again, and a token that
    comes out differently the second time raises `SpotCheckError` (it is on screen)."""

    def __init__(self, streamer: Streamer) -> None:
        self.streamer = streamer
        self.tokens: list[Tensor] = []
        self.prompted = False
        self.next = -1   # -1: the prompt comes next

    def again(self) -> None:
        self.next = -1

    def put(self, value: Tensor) -> None:
        i, self.next = self.next, self.next + 1
        if i < 0:
            if not self.prompted:
                self.prompted = True
                self.streamer.put(value)
        elif i < len(self.tokens):
            if not torch.equal(self.tokens[i], value):
                raise SpotCheckError(f"new token {i} was streamed before a spot check found a faulty node "
                                     f"upstream of it: the verified route chose {value.tolist()}, the "
                                     f"streamer showed {self.tokens[i].tolist()}")
        else:
            self.tokens.append(value.clone())
            self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def _restartable(cfg: GenerationConfig, streamer: Streamer | None) -> tuple[GenerationConfig, _Shown | None]:
    """The config with a fixed seed (a restart then draws the same numbers) and the streamer
    wrapped for restarts."""
    if cfg.do_sample and cfg.seed is None:
        cfg = replace(cfg, seed=int.from_bytes(os.urandom(7), "little"))
    return cfg, (_Shown(streamer) if streamer is not None else None)


def _redo_in(error: BaseException) -> "Redo | None":
    """The `Redo` that `error` is or only holds (a step over several sessions raises a group)."""
    if isinstance(error, Redo):
        return error
    if isinstance(error, BaseExceptionGroup):
        redos = [_redo_in(e) for e in error.exceptions]
        if redos and all(r is not None for r in redos):
            return min(redos, key=lambda r: r.position)  # type: ignore[union-attr]
    return None


def _again(redo: Redo, redos: int, start: int, shown: _Shown | None) -> None:
    if redo.position < start:
        raise SpotCheckError(f"node {redo.peer} returned wrong outputs from position {redo.position}, before "
                             f"this call's first position {start}: what earlier calls on this session returned "
                             f"may be wrong (the session now runs without that node)") from None
    if redos >= MAX_REDOS:
        raise SpotCheckError(f"spot checks found a faulty node {redos + 1} times in one generation; "
                             f"giving up (the last: {redo.peer})") from None
    if shown is not None:
        shown.again()


def generate(step: StepFn, head: ClientHead, input_ids: Tensor, cfg: GenerationConfig,
             streamer: Streamer | None = None, start: int = 0) -> Tensor:
    """Prefill `input_ids` at position `start` then decode; returns prompt + new tokens. A step
    raising `Redo` starts the generation again from the prompt (at most MAX_REDOS times)."""
    cfg, shown = _restartable(cfg, streamer)
    for redos in range(MAX_REDOS + 1):
        loop = generation_loop(head, input_ids, cfg, shown, start)
        try:
            request = next(loop)
            while True:
                request = loop.send(step(*request))
        except StopIteration as done:
            return done.value
        except BaseException as e:
            redo = _redo_in(e)
            if redo is None:
                raise
            loop.close()
            _again(redo, redos, start, shown)
    raise AssertionError("unreachable")


async def agenerate(step: Callable[[Tensor, int], Awaitable[Tensor]], head: ClientHead,
                    input_ids: Tensor, cfg: GenerationConfig, streamer: Streamer | None = None,
                    start: int = 0) -> Tensor:
    """`generate` with an async step (a remote chain)."""
    cfg, shown = _restartable(cfg, streamer)
    for redos in range(MAX_REDOS + 1):
        loop = generation_loop(head, input_ids, cfg, shown, start)
        try:
            request = next(loop)
            while True:
                request = loop.send(await step(*request))
        except StopIteration as done:
            return done.value
        except BaseException as e:
            redo = _redo_in(e)
            if redo is None:
                raise
            loop.close()
            _again(redo, redos, start, shown)
    raise AssertionError("unreachable")
