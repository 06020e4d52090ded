"""The OpenAI API's shapes, without I/O: requests checked into frozen values, responses and
stream chunks built as dicts, errors as `ApiError` with the API's status codes and body.

    try:
        request = parse_chat(body)          # body: the decoded JSON of POST /v1/chat/completions
    except ApiError as e:
        return e.status, e.body()           # {"error": {"message", "type", "param", "code"}}

What the gateway (`pipeline._gateway`) supports of the API, and how it maps onto `generate`:

* ``temperature`` 0 is greedy decoding; above 0 it samples (``do_sample=True``) with that
  temperature; the default is the API's, 1 (sampling). ``top_p``, ``seed``, ``stop`` (a string or
  up to 4), ``max_tokens`` (``max_completion_tokens`` on chat) map to their `generate` options;
  vLLM's extensions ``top_k``, ``min_p`` and ``repetition_penalty`` too.
* ``n`` above 1, non-zero ``presence_penalty`` / ``frequency_penalty``, ``logprobs``,
  ``logit_bias``, ``tools``, ``response_format``, ``echo``, ``suffix``, ``best_of`` above 1 are
  refused with a 400 that names the parameter; so is any field the API does not have.
* completions take one prompt: a string, a list of token ids, or a list holding one of those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4                 # the API's limit on stop sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# fields a client library may send that change nothing here
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "stream_options",
            "prediction", "modalities", "reasoning_effort", "web_search_options"}
# fields the API has that the gateway refuses unless they have the value that means "off"
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "audio": (None,),
}
_SAMPLING = {"model", "stream", "temperature", "top_p", "seed", "stop", "top_k", "min_p",
             "repetition_penalty"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "max_tokens"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_tokens", "max_completion_tokens"}


class ApiError(Exception):
    """An error answered in the OpenAI shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist: this gateway serves '{served}' "
                    f"(GET /v1/models lists it)", param="model", code="model_not_found")


def swarm_unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="swarm_unavailable")


def overloaded(message: str) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="overloaded")


def server_error(message: str) -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")


@dataclass(frozen=True)
class Sampling:
    """What a request asks of generation; `max_tokens` None means the endpoint's default."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def generate_options(self) -> dict[str, Any]:
        """Keyword arguments of `generate` (without max_new_tokens, eos ids and the streamer)."""
        options: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            options.update(temperature=self.temperature, top_p=self.top_p)
            if self.seed is not None:
                options["seed"] = self.seed
            for name in ("top_k", "min_p"):
                if getattr(self, name) is not None:
                    options[name] = getattr(self, name)
        if self.repetition_penalty is not None:
            options["repetition_penalty"] = self.repetition_penalty
        if self.stop:
            options["stop_strings"] = list(self.stop)
        return options


@dataclass(frozen=True)
class GenRequest:
    """One checked request: a completion (`prompt`) or a chat completion (`messages`)."""

    kind: str                                   # "completion" | "chat"
    model: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False                 # stream_options.include_usage
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] = field(default=())


# --- parsing ---------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_request(f"'{name}' must be in {bound}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    if value < lo or (hi is not None and value > hi):
        raise bad_request(f"'{name}' must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                          + f", got {value}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("'stop' sequences must not be empty", "stop")
    return tuple(dict.fromkeys(stops))


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    """`value` is one of `offs` (a bool only equal to a bool: `n: true` is not `n: 1`)."""
    return value is None or any(value == o and isinstance(value, bool) == isinstance(o, bool) for o in offs)


def _check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in _IGNORED:
            continue
        if name in _OFF_VALUES:
            if _is_off(value, _OFF_VALUES[name]):
                continue
            raise bad_request(f"'{name}'={value!r} is not supported by this server (lamina); leave it out",
                              name, "unsupported_parameter")
        raise bad_request(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")


def _common(body: Any, known: set[str], max_tokens_names: tuple[str, ...]) -> tuple[str, Sampling, bool, bool]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_fields(body, known)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the id of a model from GET /v1/models", "model")
    max_tokens = None
    for name in max_tokens_names:
        if (value := _integer(body, name, 1)) is not None:
            max_tokens = value
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=_stop(body),
        top_k=_integer(body, "top_k", 0) if body.get("top_k") != -1 else 0,   # vLLM: -1 means off
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0) if body.get("min_p") is not None else None,
        repetition_penalty=(_number(body, "repetition_penalty", 1.0, 0.0, 1e6, lo_open=True)
                            if body.get("repetition_penalty") is not None else None),
    )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    return model, sampling, stream, include_usage


def parse_completion(body: Any) -> GenRequest:
    """A POST /v1/completions body, checked; raises `ApiError` (400) naming what is wrong."""
    model, sampling, stream, include_usage = _common(body, COMPLETION_FIELDS, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                     # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad_request("'prompt' must be a string or a list of token ids (one prompt per request: "
                              "send several requests for several prompts)", "prompt")
        prompt = tuple(prompt)
    elif not isinstance(prompt, str):
        raise bad_request("'prompt' is required: a string or a list of token ids", "prompt")
    return GenRequest("completion", model, sampling, stream, include_usage, prompt=prompt)


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"messages[{index}].content: only text parts are supported, got {kind!r}",
                                  f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts",
                      f"messages[{index}].content")


def parse_chat(body: Any) -> GenRequest:
    """A POST /v1/chat/completions body, checked; raises `ApiError` (400) naming what is wrong."""
    model, sampling, stream, include_usage = _common(body, CHAT_FIELDS, ("max_tokens", "max_completion_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required: a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
                              + (" (tools are not supported)" if role in ("tool", "function") else ""),
                              f"messages[{i}].role")
        checked.append({"role": ROLES[role], "content": _content(message, i)})
    return GenRequest("chat", model, sampling, stream, include_usage, messages=tuple(checked))


# --- responses ---------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str | None,
                    use: dict | None, *, chunk: bool = False) -> dict[str, Any]:
    """A text completion, or (`chunk`) one of its stream chunks: the same object, streamed."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [choice], "system_fingerprint": None}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, created: int, model: str, text: str, finish: str | None,
              use: dict[str, int]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None, "tool_calls": None}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, str] | None, finish: str | None,
               use: dict | None = None, *, with_usage: bool = False) -> dict[str, Any]:
    """A chat stream chunk; `delta` None makes the last one (no choices, the usage) of
    ``stream_options.include_usage``; `with_usage` adds ``"usage": null`` to the others then."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": choices, "system_fingerprint": None}
    if with_usage or use is not None:
        body["usage"] = use
    return body


# --- stop sequences over streamed text ------------------------------------------------

class StopText:
    """Text that grows piece by piece, cut before the first stop sequence (the API leaves the
    sequence out). `feed(piece)` returns what may be shown now: it holds back an end of the
    text that could still become a stop sequence. `flush()` hands out what was held back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""          # everything fed (up to the stop)
        self.shown = 0          # characters of `text` handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.shown - len(s)))) >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def flush(self) -> str:
        return self._take(len(self.text))

    def _held(self) -> int:
        """The longest end of the text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.shown)
        out, self.shown = self.text[self.shown:upto], upto
        return out
