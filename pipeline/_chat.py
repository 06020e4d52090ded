"""Chat: a model's chat template rendered with Jinja the way transformers renders it, and
`chat(model, messages, ...)` — the reply to a conversation, streamed as text while it comes.

`LocalModelForCausalLM.chat` and `DistributedModelForCausalLM.chat` call `chat` here.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

import torch

from ._errors import InvalidInputError, LaminaError
from ._streamers import TextStreamer

Message = dict[str, Any]

# End-of-turn tokens of common templates: a generation stops on one when the template uses it
# (besides the model's eos ids), e.g. ChatML's <|im_end|> where eos is <|endoftext|>.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
                "<|endoftext|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<|eom_id|>")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """As transformers' `_compile_jinja_template`: an immutable sandbox, trim_blocks,
    lstrip_blocks, loop controls, and the same globals and `tojson` filter."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Message], *,
                         add_generation_prompt: bool = True, tools=None, documents=None,
                         **variables: Any) -> str:
    """Render `template` over `messages` (dicts with "role" and "content")."""
    for m in messages:
        if not isinstance(m, dict):
            raise InvalidInputError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
    return _compile(template).render(messages=[dict(m) for m in messages], tools=tools,
                                     documents=documents,
                                     add_generation_prompt=add_generation_prompt, **variables)


def stop_token_ids(tokenizer, eos_token_ids: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids a reply ends on: the model's eos ids and the end-of-turn tokens its template uses."""
    ids = list(eos_token_ids) + list(tokenizer.eos_token_ids)
    template = tokenizer.chat_template or ""
    for text in _END_OF_TURN:
        if text in template and (i := tokenizer._tok.token_to_id(text)) is not None:
            ids.append(i)
    return tuple(dict.fromkeys(int(i) for i in ids))


class ReplyStreamer(TextStreamer):
    """A generation streamer that hands the reply's text to `on_text` in pieces as tokens come
    (never half a character, see `IncrementalDecoder`): it skips the prompt and the stop
    tokens. `should_stop()` true aborts the generation at the next token (`ReplyInterrupted`);
    the text so far stays in `text`."""

    def __init__(self, tokenizer, on_text: Callable[[str], Any] | None = None,
                 stop_ids: Iterable[int] = (), should_stop: Callable[[], bool] | None = None) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.on_text, self.should_stop = on_text, should_stop
        self.stop_ids = set(stop_ids)
        self.text = ""          # the text handed out so far
        self.stopped = False    # a stop token came

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            super().put(value)
            return
        if self.should_stop is not None and self.should_stop():
            raise ReplyInterrupted(self.text)
        token = int(value.reshape(-1)[0])
        if self.stopped:
            return
        if token in self.stop_ids:
            self.stopped = True
            return
        super().put(value.reshape(-1)[:1])

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not text:
            return
        self.text += text
        if self.on_text is not None:
            self.on_text(text)


class ReplyInterrupted(LaminaError):
    """A reply stopped by `should_stop`; `partial` is the text made until then."""

    def __init__(self, partial: str) -> None:
        super().__init__("the reply was interrupted")
        self.partial = partial


def _file_eos(model) -> tuple[int, ...]:
    """The eos ids of the model's generation_config.json (an instruct model's end-of-turn ids)."""
    eos = getattr(model, "generation_defaults", {}).get("eos_token_id")
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def context_length(model, limit: int | None = None) -> int:
    n = int(model.config.max_position_embeddings)
    return min(n, limit) if limit else n


def fit_messages(tokenizer, messages: Sequence[Message], budget: int) -> list[Message]:
    """`messages` without their oldest turns (system messages kept) until the rendered prompt
    takes at most `budget` tokens; raises `InvalidInputError` (a ValueError) when the last
    message alone does not fit."""
    msgs = list(messages)
    while True:
        n = len(tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False))
        if n <= budget:
            return msgs
        drop = next((i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"), None)
        if drop is None:
            raise InvalidInputError(f"the conversation's last message does not fit the context "
                                    f"({n} tokens, {budget} allowed)")
        del msgs[drop]
        # a turn starts with a user message: drop the replies left without their question
        while drop < len(msgs) - 1 and msgs[drop].get("role") not in ("user", "system"):
            del msgs[drop]


def chat(model, messages: Sequence[Message], *, max_new_tokens: int = 256,
         streamer: Callable[[str], Any] | None = None, should_stop: Callable[[], bool] | None = None,
         context: int | None = None, return_interrupted: bool = True, **sampling: Any) -> str:
    """The assistant's reply to `messages` (sampling as the model's generation_config.json
    says, else greedy, unless ``do_sample`` is given; other keyword arguments are `generate`'s
    sampling options). `streamer(text)` gets the reply's text in
    chunks as tokens come. The reply ends at the model's eos or the template's end-of-turn token,
    or after `max_new_tokens`. Oldest turns are left out when the conversation would overflow
    `context` tokens (default: the model's context length, prompt + `max_new_tokens`).
    `should_stop()` is asked before each new token; when true the reply stops there and the text
    so far is returned (or `ReplyInterrupted` raised, with ``return_interrupted=False``)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InvalidInputError("this model has no tokenizer: chat needs one")
    budget = context_length(model, context) - max_new_tokens
    if budget < 1:
        raise InvalidInputError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in "
                                f"{context_length(model, context)} tokens of context")
    msgs = fit_messages(tokenizer, messages, budget)
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    stops = stop_token_ids(tokenizer, (*model.config.eos_token_ids, *_file_eos(model)))
    text = ReplyStreamer(tokenizer, streamer, stops, should_stop)
    try:
        model.generate(ids, streamer=text, max_new_tokens=max_new_tokens,
                       eos_token_id=list(stops), **sampling)
    except ReplyInterrupted:
        if not return_interrupted:
            raise
    return text.text
