"""Streamers: text of the new tokens while `generate` makes them, as transformers' streamers.

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, args=(ids,),
                              kwargs=dict(streamer=streamer, max_new_tokens=64))
    thread.start()
    for text in streamer:            # in this thread, piece by piece
        print(text, end="", flush=True)

`generate` calls ``put(tokens)`` (the prompt first, then each step's token) and ``end()``.
Text comes from an `IncrementalDecoder`: each token's text as soon as it is whole, never half
a character, without decoding the text before it again (transformers' streamers re-decode
everything since the last word: O(n^2) over a long reply).
"""

from __future__ import annotations

import queue
from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor

from ._errors import InvalidInputError, StreamTimeoutError


class IncrementalDecoder:
    """The text of a token sequence that grows one token at a time: `step(id)` returns what the
    new token adds ("" while it ends inside a multi-byte character), `flush()` what is left at
    the end. The pieces joined are ``tokenizer.decode(ids, **decode_kwargs)``.

    With lamina's `Tokenizer` (or a bare `tokenizers.Tokenizer`) this is the `tokenizers`
    library's `DecodeStream`. Any other tokenizer with ``decode(ids)`` is decoded over a short
    window, as transformers' and vLLM's detokenizers do: the tokens since the last piece plus
    the few before them (which give the context of their leading space), and a piece is handed
    out only when it does not end in U+FFFD (an unfinished character)."""

    def __init__(self, tokenizer: Any, **decode_kwargs: Any) -> None:
        self.tokenizer, self.decode_kwargs = tokenizer, decode_kwargs
        self.ids: list[int] = []
        self.text = ""                      # the pieces handed out so far
        self._backend, skip = _backend(tokenizer)
        self._stream = None
        if self._backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:             # tokenizers < 0.21: the window below does it
                self._backend = None
            else:
                self._stream = DecodeStream(skip_special_tokens=decode_kwargs.get("skip_special_tokens", skip))
        self._prefix = self._read = 0       # the window: ids[_prefix:_read] were decoded already

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._stream is not None:
            piece = self._stream.step(self._backend, int(token_id)) or ""
        else:
            piece = self._window_step()
        self.text += piece
        return piece

    def _window_step(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What decoding every token gives beyond the pieces so far: an unfinished character at
        the end (as U+FFFD), or text a decoder holds back until the end."""
        full = self._decode(self.ids)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)


def _backend(tokenizer: Any) -> tuple[Any, bool]:
    """The `tokenizers.Tokenizer` that decodes for `tokenizer`, and whether its ``decode``
    skips special tokens by default; (None, False) for any other tokenizer."""
    from ._tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer._tok, True
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:
        return None, False
    return (tokenizer, True) if isinstance(tokenizer, Backend) else (None, False)


class TextStreamer:
    """Prints the text as `generate` makes it (transformers' `TextStreamer`). ``skip_prompt``
    leaves out the prompt; other keyword arguments go to the tokenizer's ``decode`` (e.g.
    ``skip_special_tokens=True``). Subclasses override `on_finalized_text`. One row only:
    a batch of several raises `InvalidInputError`."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        if tokenizer is None:
            raise InvalidInputError("a text streamer needs a tokenizer (this model has none: stream token ids "
                                    "with a streamer of your own)")
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.decoder = IncrementalDecoder(tokenizer, **decode_kwargs)
        self.next_tokens_are_prompt = True

    def put(self, value: Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise InvalidInputError(f"{type(self).__name__} only supports batch size 1, got {value.shape[0]} rows")
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        for token in value.reshape(-1).tolist():
            piece = self.decoder.step(token)
            if piece:
                self.on_finalized_text(piece)

    def end(self) -> None:
        """Hand out what is left, and get ready for the next `generate` call."""
        rest = self.decoder.flush()
        self.decoder = IncrementalDecoder(self.tokenizer, **self.decode_kwargs)
        self.next_tokens_are_prompt = True
        self.on_finalized_text(rest, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """transformers' `TextIteratorStreamer`: `generate` runs in one thread, another iterates
    over the text. ``timeout`` (seconds) bounds each wait for the next piece: past it the
    iterator raises `StreamTimeoutError` (a `queue.Empty`, as transformers raises). When the
    generation fails, the iterator raises its error instead of waiting for text that will not
    come (`generate` calls `fail`)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def fail(self, error: BaseException) -> None:
        """The generation feeding this streamer failed: the iterator raises `error`."""
        self.text_queue.put(_Failed(error))

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        try:
            value = self.text_queue.get(timeout=self.timeout)
        except queue.Empty:
            raise StreamTimeoutError(f"no text came within the streamer's timeout of {self.timeout} s") from None
        if value is self.stop_signal:
            raise StopIteration
        if isinstance(value, _Failed):
            raise value.error
        return value


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


@contextmanager
def telling(streamer: Any) -> Iterator[None]:
    """Around a generate call: when it fails, a streamer that can hear of it (`fail`) does, so
    a thread iterating over it is not left waiting; an interrupt (Ctrl-C) ends its stream."""
    try:
        yield
    except Exception as e:
        if callable(getattr(streamer, "fail", None)):
            streamer.fail(e)
        raise
    except BaseException:
        if callable(getattr(streamer, "fail", None)):
            streamer.end()
        raise
